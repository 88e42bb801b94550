"""``fr.distill`` on two processes (gloo, CPU) equals the single-process run on the same global
batches, with DDP and with FSDP2; a run resumed from its checkpoint equals an uninterrupted one.

Oracles: the single-process ``distill`` of this same library on the whole batches (itself
checked against hand-computed teacher-forced MSEs in test_distill.py), and the uninterrupted
run. The two ranks are spawned once (``torch.multiprocessing``) and run every distributed case.

Tolerance: the two-rank runs sum the gradients of the two shards across ranks (DDP's
all-reduce, FSDP's reduce-scatter), a different fp32 summation order than one backward over
the whole batch. Measured after 6 steps: 7e-8 relative in the losses, 3e-8 absolute (4e-7
relative) in the parameters. ``RTOL = 1e-5`` / ``ATOL = 1e-6`` leaves a margin of 30x and
more, yet fails what a wrong reduction gives: weighting the shards (3 and 2 rows) equally
instead of by rows is off by 4e-2 in the parameters, a missing world-size scale of the loss by
1e-3 (through the gradient clipping). A resumed run repeats the same operations in the same
order: it must equal the uninterrupted run exactly.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flurka_rewrite as fr
from flurka_rewrite.kernels.attention import FlurkaAttention
import zoo_hf

STEPS, CUT, WORLD = 6, 3, 2
RTOL, ATOL = 1e-5, 1e-6


def _setup():
    """Teacher, student (performer, dk=8, W redrawn every 2 calls) and 6 global batches of 5
    rows (odd: the ranks get 3 and 2 rows, so the row weighting matters), padded rows too."""
    e = zoo_hf.build("bert")
    teacher = e.model.eval()
    student = fr.convert(teacher, kernel="performer", dk=8, example_inputs=e.example_inputs,
                         max_seq_len=64, seed=0)
    for m in student.modules():
        if isinstance(m, FlurkaAttention):
            m.feature_map.redraw_interval = 2
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(5, zoo_hf.VOCAB, (5, zoo_hf.SEQ), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -4:] = 0
        mask[4, -2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return teacher, student, batches


def _flurka(student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.state_dict().items() if ".flurka" in k}


def _run(strategy, steps=STEPS, rows=None, **kw):
    """distill on the test's batches (``rows``: keep only that slice of every batch)."""
    teacher, student, batches = _setup()
    if rows is not None:
        batches = [{k: v[rows] for k, v in b.items()} for b in batches]
    res = fr.distill(student, teacher, batches, steps=steps, lr=1e-2, seed=3, progress=False,
                     strategy=strategy, **kw)
    return {"losses": res.losses, "sites": res.site_losses, "flurka": _flurka(student),
            "strategy": res.strategy, "world": res.world_size, "resumed_at": res.resumed_at}


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    try:
        out = {"ddp": _run("ddp"), "auto": _run("auto", steps=2), "fsdp": _run("fsdp")}
        # each rank given its own rows (3 and 2), as from a DistributedSampler
        own = slice(0, 3) if rank == 0 else slice(3, 5)
        out["presharded"] = _run("ddp", rows=own, shard_data=False)
        ckpt = os.path.join(tmp, "ckpt")
        out["fsdp_cut"] = _run("fsdp", steps=CUT, checkpoint=ckpt)
        out["fsdp_resumed"] = _run("fsdp", checkpoint=ckpt, resume=True)
        out["saved_once"] = sorted(os.listdir(ckpt))
        if rank == 0:
            torch.save(out, os.path.join(tmp, "result.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of the distributed cases, from rank 0 of a two-process gloo group."""
    tmp = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(WORLD, tmp), nprocs=WORLD, join=True)
    return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single():
    return _run("none")


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(two_ranks, single, strategy):
    got = two_ranks[strategy]
    assert (got["strategy"], got["world"]) == (strategy, WORLD)
    assert got["losses"] == pytest.approx(single["losses"], rel=RTOL)
    assert got["sites"] == pytest.approx(single["sites"], rel=RTOL)
    _close(got["flurka"], single["flurka"])
    # the oracle trained: the comparison is not between two untouched models
    _, fresh, _ = _setup()
    assert any(not torch.equal(v, _flurka(fresh)[k]) for k, v in single["flurka"].items())
    assert single["losses"][-1] < single["losses"][0]


def test_presharded_data_equals_one_process(two_ranks, single):
    got = two_ranks["presharded"]
    assert got["losses"] == pytest.approx(single["losses"], rel=RTOL)
    _close(got["flurka"], single["flurka"])


def test_auto_is_ddp_under_a_process_group(two_ranks, single):
    got = two_ranks["auto"]
    assert got["strategy"] == "ddp"
    assert got["losses"] == pytest.approx(single["losses"][:2], rel=RTOL)


def test_fsdp_resume_equals_uninterrupted(two_ranks):
    cut, resumed, full = two_ranks["fsdp_cut"], two_ranks["fsdp_resumed"], two_ranks["fsdp"]
    assert len(cut["losses"]) == CUT and resumed["resumed_at"] == CUT
    assert resumed["losses"] == full["losses"]
    for k, v in full["flurka"].items():
        assert torch.equal(resumed["flurka"][k], v), k
    assert two_ranks["saved_once"] == ["distill.pt"]  # one file (rank 0), no temporaries left


def test_single_process_resume_equals_uninterrupted(tmp_path, single):
    cut = _run("none", steps=CUT, checkpoint=tmp_path, checkpoint_every=1)
    assert cut["losses"] == single["losses"][:CUT]
    resumed = _run("none", checkpoint=tmp_path, resume=True)
    assert resumed["losses"] == single["losses"]
    for k, v in single["flurka"].items():
        assert torch.equal(resumed["flurka"][k], v), k


def test_clear_errors(tmp_path):
    teacher, student, batches = _setup()
    with pytest.raises(ValueError, match="needs an initialised process group"):
        fr.distill(student, teacher, batches, steps=1, strategy="fsdp", progress=False)
    with pytest.raises(ValueError, match="strategy must be one of"):
        fr.distill(student, teacher, batches, steps=1, strategy="deepspeed", progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        fr.distill(student, teacher, batches, steps=1, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        fr.distill(student, teacher, batches, steps=1, checkpoint=tmp_path, resume=True,
                   progress=False)
    fr.distill(student, teacher, batches, steps=2, checkpoint=tmp_path, progress=False)
    with pytest.raises(ValueError, match="written with seed=0"):
        fr.distill(student, teacher, batches, steps=3, seed=1, checkpoint=tmp_path,
                   resume=True, progress=False)
    with pytest.raises(ValueError, match="at step 2, past steps=1"):
        fr.distill(student, teacher, batches, steps=1, checkpoint=tmp_path, resume=True,
                   progress=False)
