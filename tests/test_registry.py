"""The registry is the one list: every family it declares is in every guarantee table.

A family is one module under ``src/upop/arch/`` ending in ``register_family(...)`` (see
``docs/design.md``, "Adding a family"). These tests fail when a registered family, class or task is
missing from a table another promise iterates, so a new family is covered by its registration
plus one row in ``tests/_families.py``.
"""

from __future__ import annotations

import pytest

import upop.models.folders as M
from upop.arch import CLASSES, FAMILIES, TINY, Family, ModelClass, TinyModel, classes_for, pairs, register_family
from upop.arch._spec import ArchSpec
from upop.tasks import get_task
from upop.tasks.registry import task_entries, task_names

from ._families import FAMILIES as TABLE
from ._families import row_of


def test_every_family_module_registers_itself():
    """Each public module of the arch package but its infrastructure (``arch.INFRASTRUCTURE``: the
    registry, the group type) holds a registered family (and nothing else in ``src/`` registers one)."""
    import importlib
    import pkgutil

    import upop.arch as arch

    owned = set()
    for info in pkgutil.iter_modules(arch.__path__):
        if info.name.startswith("_") or info.name in arch.INFRASTRUCTURE:
            continue
        module = importlib.import_module(f"upop.arch.{info.name}")
        found = [v for v in vars(module).values() if isinstance(v, Family) and FAMILIES.get(v.spec.name) is v]
        assert found, f"upop/arch/{info.name}.py registers no family"
        owned |= {f.spec.name for f in found}
    assert owned == set(FAMILIES)


@pytest.mark.parametrize("tiny", sorted(TINY))
def test_every_tiny_model_builds_its_class_and_has_a_row_in_the_engine_table(tiny):
    """make-model, the tests' engine table (masked == pruned, save/load, Hub load) and the class."""
    model = M.make_model(tiny)
    assert type(model).__name__ == TINY[tiny].model_class
    assert row_of(tiny) in TABLE, f"tests/_families.py has no row for the registered tiny model {tiny!r}"
    assert type(TABLE[row_of(tiny)][0]()).__name__ == TINY[tiny].model_class


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_a_tiny_model(family):
    """A family nobody can build cannot be tested: each declares at least one tiny model."""
    assert FAMILIES[family].tiny, f"family {family!r} registers no tiny model"


def untested(classes) -> list[tuple[str, str, str]]:
    """(family, task, class) for every task a registered class declares that no tiny model of its
    family serves: such a (family, task) pair would be in no guarantee table (they iterate
    :func:`upop.arch.pairs`, the tiny models' tasks)."""
    served = {(family.spec.name, task) for family, _ in classes.values() for tiny in family.tiny
              for task in classes[tiny.model_class][1].tasks}
    return [(family.spec.name, task, cls.name) for family, cls in classes.values() for task in cls.tasks
            if (family.spec.name, task) not in served]


@pytest.mark.parametrize("name", sorted(name for name, (_, cls) in CLASSES.items() if cls.tasks))
def test_every_class_that_declares_a_task_has_a_tiny_model_for_it(name):
    """A class registered for a task is tested under that task by the act alone: its family has a
    tiny model serving the task (the class itself, or a sibling of the same family for the same task:
    ``DeiTForImageClassification`` through the DeiT with teacher, ``CLIPVisionModel`` under distill
    through ``CLIPModel``), so :func:`upop.arch.pairs` and every table over it hold the task."""
    missing = [task for _, task, owner in untested(CLASSES) if owner == name]
    assert not missing, (f"{name} ({CLASSES[name][0].spec.name}) declares {missing}, which no tiny model of its "
                         "family serves: register a TinyModel for it in the family module")


def test_a_class_without_a_tiny_model_for_its_task_is_found(monkeypatch):
    """The check above can fail: a family registered with a classifier but no tiny model."""
    from upop.arch import registry as reg

    for table in ("FAMILIES", "CLASSES", "TINY", "SPECS"):
        monkeypatch.setattr(reg, table, dict(getattr(reg, table)))
    register_family(Family(spec=_toy_spec("untested"),
                           classes=(ModelClass("UntestedForImageClassification", tasks=("classification",)),)))
    assert untested(reg.CLASSES) == [("untested", "classification", "UntestedForImageClassification")]
    assert untested(CLASSES) == []  # the real registry (the module's own binding, not patched)


@pytest.mark.parametrize("tiny, task", pairs())
def test_every_pair_is_served_by_its_task_and_has_shapes_data(tiny, task):
    """Each (tiny model, task) pair: the task is registered (so ``upop data shapes`` writes data for
    it: a registration names its Shapes writer) and accepts the class."""
    assert task in task_names(), f"{tiny!r} names the task {task!r}, which is not registered"
    model = M.make_model(tiny)
    get_task(task).check_model(model)


def test_every_task_is_served_by_a_registered_class():
    for task in task_entries():
        assert classes_for(task), f"no registered class serves task {task!r}"


def test_gpu_check_runs_every_tiny_model_on_its_data_task():
    from .test_gpu_check import gpu_check

    assert gpu_check.FAMILY_TASKS == {t.name: t.data_task for t in TINY.values()}


def test_export_table_is_the_registry():
    from .test_export import CASES

    for tiny in TINY.values():
        info = CLASSES[tiny.model_class][1]
        if info.export_refused is None:
            assert tiny.name in CASES
        for part, how in info.export.items():
            if how == "features":
                assert f"{tiny.name}-{part}-tower" in CASES


# ----------------------------------------------------------------------------- registering


def _toy_spec(name: str) -> ArchSpec:
    from upop.arch import vit

    return ArchSpec(name=name, model_types=(f"{name}_type",), towers=vit.VIT.towers, set_head_dim=vit.VIT.set_head_dim)


def test_a_registered_family_reaches_the_tables_by_that_act_alone(monkeypatch):
    """Registering a family (here a copy of ViT's under new names) makes make-model build it, the
    tasks accept its class, the pairs list it and load_compressed resolve its class name."""
    from upop.arch import registry as reg
    from upop.checkpoint.folder import model_class

    for table in ("FAMILIES", "CLASSES", "TINY", "SPECS"):
        monkeypatch.setattr(reg, table, dict(getattr(reg, table)))
    vit = TINY["vit"]
    family = register_family(Family(
        spec=_toy_spec("toyvit"),
        classes=(ModelClass("ViTForImageClassification2", tasks=("classification",)),),
        tiny=(TinyModel("toyvit", "ViTForImageClassification2", build=vit.build, processor=vit.processor,
                        data_task="classification", class_names=vit.class_names),),
    ))
    assert "toyvit" in reg.TINY and ("toyvit", "classification") in reg.pairs()
    assert "ViTForImageClassification2" in reg.classes_for("classification")
    assert "ViTForImageClassification2" in get_task("classification").model_classes
    with pytest.raises(Exception, match="not available"):  # known, but neither transformers' nor upop's
        model_class("ViTForImageClassification2")
    assert reg.FAMILIES["toyvit"] is family


@pytest.mark.parametrize("make, message", [
    (lambda: Family(spec=_toy_spec("t1"), classes=(ModelClass("A", tasks=("retrieval",)),),
                    tiny=(TinyModel("t1", "B", build=None, processor=None, data_task="retrieval"),)),
     "not one of its classes"),
    (lambda: Family(spec=_toy_spec("t2"), classes=(ModelClass("A", tasks=("retrieval",)),),
                    tiny=(TinyModel("t2", "A", build=None, processor=None, data_task="vqa"),)),
     "does not serve"),
    (lambda: ModelClass("A", reads=("audio",)), "reads"),
    (lambda: register_family(Family(spec=_toy_spec("t3"), classes=(ModelClass("CLIPModel"),))), "already registered"),
])
def test_inconsistent_registrations_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_label_free_reading_follows_the_declared_inputs():
    from upop.tasks.distill import kind

    expected = {"CLIPModel": "paired", "ViTForImageClassification": "vision", "BertForSequenceClassification": "text"}
    for tiny in TINY.values():
        if tiny.model_class in expected:
            assert kind(M.make_model(tiny.name)) == expected[tiny.model_class]
