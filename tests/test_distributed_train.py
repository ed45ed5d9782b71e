"""Training under torchrun (issue 31): 2 gloo processes compute what one process computes with the same
global batch split into 2 accumulated micro-batches, rank 0 alone writes, and ``--resume`` needs the same N."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cbam_viz import distributed
from cbam_viz.distributed import DistContext
from cbam_viz.training import parallel
from cbam_viz.training.data import normalize, random_resized_crop_flip
from cbam_viz.training.recipe import Recipe, lr_at
from cbam_viz.training.step import epoch_order
from cbam_viz.training.train import load_split, start_run, train
from tests.synthetic import make_image_folder
from tests.test_distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
ARCH = "resnet18"
CLASSES = ("n001", "n002", "n003")
# 27 files, 3 held out (one a class): 24 train in 3 steps of 8 an epoch, 4 images a rank a step; the
# held-out files are monitored (rank 0 alone) and the weight average kept (rank 0 alone).
RECIPE = Recipe(epochs=2, batch_size=8, sizes=((0, 32),), cache_size=40, eval_size=32, eval_every=1, bf16=False,
                lr=0.02, holdout=0.12, ema_decay=0.9)
STEPS_PER_EPOCH = 3
# One torch thread in the ranks and in the reference: the same kernels then add in the same order. With
# BatchNorm over 4 images (layer4 sees 1x1 maps at 32 px) a rounding difference of a thread count grows
# to a few hundredths in 6 steps, which would hide a real difference.
pytestmark = pytest.mark.usefixtures("one_thread")


def rank_main(out: Path, data: Path) -> None:
    """One rank's work (run by tests/dist_worker.py under torchrun): a whole run, the same run cut after
    one epoch and a bit and resumed, and the whole run streamed from the files. Every rank trains into
    its own ``out/rank<R>`` with its own ``out/cache<R>``, so the test sees which ranks wrote; the
    trained parameters go to ``out/params<R>.pt`` (the test's file, not the trainer's)."""
    ctx = distributed.context()
    mine, cache = out / f"rank{ctx.rank}", out / f"cache{ctx.rank}"
    full = train(ARCH, data, mine / "full", recipe=RECIPE, cache_dir=cache, progress=False)
    train(ARCH, data, mine / "cut", recipe=RECIPE, cache_dir=cache, progress=False, max_steps=STEPS_PER_EPOCH + 1)
    resumed = train(ARCH, data, mine / "cut", recipe=RECIPE, cache_dir=cache, progress=False, resume=True)
    streamed = train(ARCH, data, mine / "stream", recipe=RECIPE, progress=False, stream=True, workers=1)
    params = {name: {k: v.detach().clone() for k, v in r.model.named_parameters()}
              for name, r in (("full", full), ("resumed", resumed), ("streamed", streamed))}
    torch.save(params, out / f"params{ctx.rank}.pt")


def _torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` in a clean environment; on a timeout the whole job (torchrun
    and its workers, one process group) is killed, so a hung collective leaves no process behind."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
              and not k.startswith("CBAM_VIZ_")}, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as job:
        try:
            stdout, stderr = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            stdout, stderr = job.communicate()
            pytest.fail(f"torchrun did not finish in {timeout} s: {stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr)


def _accumulated_run(data: Path, cache: Path, run_dir: Path, parts: int) -> dict[str, torch.Tensor]:
    """The reference: one process, each global batch cropped as one process crops it, then split into
    ``parts`` micro-batches whose gradients (of loss / parts) are summed before the optimizer step."""
    split = load_split(data, RECIPE, cache_dir=cache, progress=False)
    run = start_run(ARCH, RECIPE, run_dir, n_classes=len(CLASSES), device=torch.device("cpu"))
    b = RECIPE.batch_size
    for epoch in range(RECIPE.epochs):
        gen, order = epoch_order(RECIPE, epoch, len(split.train))
        for i in range(STEPS_PER_EPOCH):
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(RECIPE, epoch * STEPS_PER_EPOCH + i, STEPS_PER_EPOCH)
            idx = order[i * b:(i + 1) * b]
            x = random_resized_crop_flip(split.images[idx].float().div_(255), 32, generator=gen,
                                         scale=RECIPE.crop_scale)
            x = normalize(x, RECIPE.mean, RECIPE.std).contiguous(memory_format=torch.channels_last)
            run.optimizer.zero_grad(set_to_none=True)
            for xs, ys in zip(x.chunk(parts), split.labels[idx].chunk(parts)):
                loss = F.cross_entropy(run.model(xs), ys, label_smoothing=RECIPE.label_smoothing) / parts
                loss.backward()
            run.optimizer.step()
    return {k: v.detach() for k, v in run.model.named_parameters()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A 2-process gloo job of :func:`rank_main` on a tiny generated ImageFolder."""
    base = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(base / "train", CLASSES, per_class=9)
    out = base / "out"
    out.mkdir()
    done = _torchrun(str(ROOT / "tests" / "dist_worker.py"), "train", str(out), str(data))
    assert done.returncode == 0, done.stderr[-3000:]
    return base, data, out, done


def test_two_processes_train_what_one_process_computes_with_accumulated_micro_batches(two_ranks, tmp_path):
    base, data, out, _ = two_ranks
    ranks = [torch.load(out / f"params{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]["full"]:  # averaged gradients: both ranks hold the same weights after every step
        assert torch.equal(ranks[0]["full"][name], ranks[1]["full"][name]), name
    reference = _accumulated_run(data, tmp_path / "cache", tmp_path / "ref", parts=2)
    assert reference.keys() == ranks[0]["full"].keys()
    for name, value in reference.items():
        torch.testing.assert_close(ranks[0]["full"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # The micro-batches matter (BatchNorm over 4 images, not 8): whole batches give other weights.
    whole = _accumulated_run(data, tmp_path / "cache", tmp_path / "whole", parts=1)
    assert max((whole[k] - reference[k]).abs().max().item() for k in reference) > 1e-3


def test_a_cut_run_resumes_on_the_same_processes_and_streaming_changes_nothing(two_ranks):
    _, _, out, _ = two_ranks
    params = torch.load(out / "params0.pt", weights_only=True)
    for name, value in params["full"].items():
        assert torch.equal(params["resumed"][name], value), name
        assert torch.equal(params["streamed"][name], value), name


def test_rank_0_alone_writes(two_ranks):
    _, _, out, done = two_ranks
    assert not (out / "rank1").exists() and not (out / "cache1").exists()  # rank 1: no run folder, no cache
    assert len(list((out / "cache0").iterdir())) == 1  # the one decoded split, written once
    for run in ("full", "cut", "stream"):
        log = (out / "rank0" / run / "log.jsonl").read_text().splitlines()
        assert len(log) == RECIPE.epochs, run  # one line an epoch: no second rank appending
    ckpt = torch.load(out / "rank0" / "full" / "last.pt", weights_only=True)
    assert ckpt["world"] == 2 and ckpt["sync_bn"] is False and "ema" in ckpt
    assert '"holdout_top1"' in (out / "rank0" / "full" / "log.jsonl").read_text()  # rank 0 monitored
    assert done.stdout.count('"epoch": 1,') == 3  # full, cut and stream each print epoch 1 once
    assert done.stdout.count("training images: streamed from the files (--stream)") == 1


def test_resuming_on_another_number_of_processes_is_refused(two_ranks, monkeypatch):
    _, data, out, _ = two_ranks
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_context", None)
    with pytest.raises(ValueError, match=r"was trained on 2 processes and this run has 1 process: resume it"):
        train(ARCH, data, out / "rank0" / "full", recipe=RECIPE, resume=True, progress=False)


def test_a_batch_that_does_not_split_is_one_sentence_under_torchrun(tmp_path):
    data = make_image_folder(tmp_path / "train", CLASSES, per_class=2)
    done = _torchrun("-m", "cbam_viz", "train", "--arch", ARCH, "--data", str(data), "--runs", str(tmp_path / "r"),
                     "--batch-size", "9", "--epochs", "1")
    assert done.returncode != 0
    assert "error: --batch-size 9 does not split over 2 processes: use a multiple of 2" in done.stderr
    assert not (tmp_path / "r").exists()


def test_the_checks_and_the_shares_on_one_and_two_processes():
    two = [DistContext(rank=r, world=2, backend="gloo") for r in (0, 1)]
    parallel.check_batch(8, two[0])
    with pytest.raises(ValueError, match="does not split over 2 processes"):
        parallel.check_batch(7, two[0])
    with pytest.raises(ValueError, match="--sync-bn needs several GPU processes.*not CPU processes"):
        parallel.check_sync_bn(True, two[0])
    with pytest.raises(ValueError, match="not one process"):
        parallel.check_sync_bn(True, DistContext())
    order = torch.arange(20)
    assert [s.tolist() for s in parallel.rank_steps(order, 8, 2, two[1])] == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert [s.tolist() for s in parallel.rank_steps(order, 8, 2, DistContext())] == [list(range(8)),
                                                                                    list(range(8, 16))]
    model = torch.nn.Linear(2, 2)
    assert parallel.wrap_model(model, DistContext()) is model
    assert parallel.reduce_sums(1.5, 3, 8, DistContext()) == (1.5, 3, 8)


def test_a_share_of_a_batch_gets_the_crops_it_gets_on_one_process():
    batch = torch.rand(6, 3, 12, 12)
    whole = random_resized_crop_flip(batch, 8, generator=torch.Generator().manual_seed(3))
    parts = [random_resized_crop_flip(batch[k * 2:(k + 1) * 2], 8, generator=torch.Generator().manual_seed(3),
                                      share=(k, 3)) for k in range(3)]
    torch.testing.assert_close(torch.cat(parts), whole)


def test_resume_keeps_working_for_checkpoints_made_before_the_world_size_was_stored(tmp_path):
    data = make_image_folder(tmp_path / "train", CLASSES, per_class=6)
    recipe = replace(RECIPE, holdout=0.0, ema_decay=0.0, epochs=2)
    run_dir = tmp_path / "run"
    train(ARCH, data, run_dir, recipe=recipe, progress=False, max_steps=3)  # epoch 1 of 2 steps, 1 step of epoch 2
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    del ckpt["world"], ckpt["sync_bn"]
    torch.save(ckpt, run_dir / "last.pt")
    assert len(train(ARCH, data, run_dir, recipe=recipe, progress=False, resume=True).history) == 2


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_the_cli_says_its_choices_once_under_torchrun(monkeypatch, tmp_path, capsys, rank, printed):
    """``bf16 auto: ...`` comes from rank 0 alone (every rank checks the options)."""
    from cbam_viz import cli
    from cbam_viz.training.train import TrainResult

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr("cbam_viz.training.train.train", lambda arch, data, run_dir, **kw: TrainResult(
        run_dir, torch.nn.Identity()))
    assert cli.main(["train", "--arch", ARCH, "--data", str(tmp_path), "--runs", str(tmp_path)]) == 0
    assert ("bf16 auto:" in capsys.readouterr().out) is printed
