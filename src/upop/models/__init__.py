"""Model folders and the model classes upop adds: loading, tiny models per family, Segmenter, BLIP NLVR, and importers of the reference checkpoints."""
