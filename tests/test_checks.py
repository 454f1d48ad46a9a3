"""The checks across options (configs.checks) read each trainer's capability record: a trainer's needs
and refusals come from its record, so a new trainer with a record of its own is checked without a
change to generic code."""
from __future__ import annotations

import pytest

from configs.capabilities import Capabilities, RunSpec
from configs.checks import check_run
from configs.errors import UserError
from configs.schema import read_options
from trainers import TRAINERS


class Picky:
    """A trainer as the checks see it: a record that refuses what it cannot do, and an own-options check."""

    name = "picky"
    capabilities = Capabilities(label="picky", modes=("prune",), fp16="it keeps two losses",
                                obs_update="compensates by itself")
    Options = None
    seen: list[RunSpec] = []

    @classmethod
    def check_options(cls, options, *, run: RunSpec) -> None:
        cls.seen.append(run)


def config(*args: str):
    return read_options(["--exp-mode", "prune", "--k", "0.25", "--source-net", "x.pth.tar", *args]).config()


@pytest.mark.parametrize("args,needle", [
    (["--amp", "fp16"], "which --trainer picky does not implement (it keeps two losses): use --amp bf16"),
    (["--obs-update"], "the picky trainer compensates by itself: drop --obs-update"),
    (["--rewind-epoch", "1"], "prune with --trainer picky does not rewind: drop --rewind-epoch"),
    (["--exp-mode", "finetune"], "--trainer picky runs --exp-mode prune, not finetune"),
])
def test_a_trainer_record_decides_what_is_refused(args, needle):
    with pytest.raises(UserError) as caught:
        check_run(config(*args), trainer=Picky)
    assert needle in str(caught.value)


def test_the_own_options_check_gets_the_run():
    Picky.seen.clear()
    check_run(config("--epochs", "3", "--scope", "layer"), trainer=Picky)
    assert Picky.seen == [RunSpec(mode="prune", layer_type="unstructured", k=0.25, scope="layer", epochs=3)]


def test_what_a_trainer_accepts_is_not_refused():
    accepting = type("Accepting", (Picky,), {"name": "accepting", "capabilities": Capabilities(
        label="accepting", rewind_point=True)})
    check_run(config("--amp", "fp16", "--obs-update", "--rewind-epoch", "1"), trainer=accepting)


def test_every_registered_trainer_has_its_own_record():
    records = {name: cls.capabilities for name, cls in TRAINERS.items()}
    assert all(isinstance(r, Capabilities) for r in records.values())
    labels = [r.label for r in records.values()]
    assert len(set(labels)) == len(labels)  # the report tells the methods apart
    assert all("prune" in r.modes for r in records.values())
    with pytest.raises(ValueError, match="unknown modes"):
        Capabilities(label="x", modes=("train",))
