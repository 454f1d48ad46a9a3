"""The checks across options (configs.checks) read each trainer's capability record: a trainer's needs
and refusals come from its record, so a new trainer with a record of its own is checked without a
change to generic code."""
from __future__ import annotations

import pytest

from configs.capabilities import Capabilities, RunSpec
from configs.checks import check_run
from configs.choices import MODES
from configs.errors import UserError
from configs.schema import read_options
from trainers import TRAINERS


class Picky:
    """A trainer as the checks see it: a record that refuses what it cannot do, and an own-options check."""

    name = "picky"
    capabilities = Capabilities(label="picky", modes=("prune",), fp16=False, obs_update="compensates by itself")
    Options = None
    seen: list[RunSpec] = []

    @classmethod
    def check_options(cls, options, *, run: RunSpec) -> None:
        cls.seen.append(run)


class Everything(Picky):
    name = "everything"
    capabilities = Capabilities(label="everything", modes=MODES, rewind_point=True)


REGISTRY = [("picky", Picky), ("everything", Everything)]


def config(*args: str):
    return read_options(["--exp-mode", "prune", "--k", "0.25", "--source-net", "x.pth.tar", *args]).config()


@pytest.mark.parametrize("args,needle", [
    (["--amp", "fp16"], "needs loss scaling, which --trainer picky does not implement: use --amp bf16"),
    (["--obs-update"], "the picky trainer compensates by itself: drop --obs-update"),
    (["--rewind-epoch", "1"], "and --trainer everything (which rewinds to them); prune with --trainer picky does not"),
    (["--exp-mode", "finetune"], "finetune uses the everything trainer; drop --trainer picky"),
])
def test_a_trainer_record_decides_what_is_refused(args, needle):
    with pytest.raises(UserError) as caught:
        check_run(config(*args), trainer=Picky, registry=REGISTRY)
    assert needle in str(caught.value)
    check_run(config(*args), trainer=Everything, registry=REGISTRY)  # what its record accepts passes


def test_the_own_options_check_gets_the_run():
    Picky.seen.clear()
    check_run(config("--epochs", "3", "--scope", "layer"), trainer=Picky, registry=REGISTRY)
    assert Picky.seen == [RunSpec(mode="prune", layer_type="unstructured", k=0.25, scope="layer", epochs=3)]


def test_the_registered_trainers_declare_what_they_do():
    records = {name: cls.capabilities for name, cls in TRAINERS.items()}
    assert {name: set(r.modes) for name, r in records.items()} == {
        "base": set(MODES), "bilevel": {"prune"}, "woodfisher": {"prune"}, "lth": {"prune"}}
    assert [name for name, r in records.items() if not r.fp16] == ["bilevel"]  # BiP: autograd.grad, no GradScaler
    assert [name for name, r in records.items() if r.obs_update is not None] == ["woodfisher"]
    assert [name for name, r in records.items() if r.fisher_rows] == ["woodfisher"]
    assert [name for name, r in records.items() if r.rewind_point] == ["lth"]
    labels = [r.label for r in records.values()]
    assert len(set(labels)) == len(labels)  # the report tells the methods apart
    with pytest.raises(ValueError, match="unknown modes"):
        Capabilities(label="x", modes=("train",))
