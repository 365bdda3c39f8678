"""Training on several processes (gloo on CPU, 2 ranks): the same run as one process with the same global batch.

The in-rank pieces (sharded sampler, global-batch losses, DDP step, identical teachers) are checked on ranks
started with torch.multiprocessing; whole runs go through `must adapt --nproc 2`, i.e. torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from must_engine import adapt, resolve_job_config
from must_engine.artifact import WEIGHTS_FILE
from must_engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from must_engine.config import ConfigError, resolve_config
from must_engine.data import ResumableSampler
from must_engine.distributed import LOCAL_BATCH, Ranks, ShardedSampler
from must_engine.losses import fairness_loss, self_training_loss
from must_engine.presets import ModelGeometry

CLASSES = ["banded", "blotchy", "braided"]
MUST = Path(sys.executable).with_name("must")
# 24 images, 9 steps of 16; a checkpoint at step 5 (80 images: a third of the way into the fourth epoch).
# A learning rate large enough that the weights move, and a tau that keeps some pseudo-labels and not others.
RUN = {"epochs": 6, "batch_size": 16, "num_workers": 0, "log_every": 1, "checkpoint_every": 5,
       "base_lr": 1e-3, "min_lr": 1e-4, "tau": 0.45, "export": "student"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(function: object, *args: object) -> None:
    """Two gloo ranks on loopback, running function(rank, *args)."""
    mp.spawn(function, args=(_free_port(), *args), nprocs=2, join=True)  # type: ignore[arg-type]


def _join(rank: int, port: int) -> Ranks:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = dist.new_group()
    assert isinstance(group, dist.ProcessGroup)
    return Ranks(rank=rank, world_size=2, local_rank=rank, backend="gloo", group=group, launcher_pid=os.getppid())


# ---- data and batch split ----------------------------------------------------------------------------


def test_each_rank_gets_its_slice_of_every_global_micro_batch_and_resumes_in_place() -> None:
    stream = list(ResumableSampler(10, seed=3, total=48))
    shards = [list(ShardedSampler(10, seed=3, total=48, start=0, rank=r, world_size=2, micro_batch=4))
              for r in range(2)]
    assert [len(shard) for shard in shards] == [24, 24]
    rebuilt = [key for k in range(6) for shard in shards for key in shard[4 * k: 4 * k + 4]]
    assert rebuilt == stream  # global micro-batch k = rank 0's k-th micro-batch, then rank 1's
    resumed = list(ShardedSampler(10, seed=3, total=48, start=16, rank=1, world_size=2, micro_batch=4))
    assert resumed == shards[1][8:]  # 16 images in = two global micro-batches of 8
    with pytest.raises(ValueError, match="whole global micro-batches"):
        ShardedSampler(10, seed=3, total=48, start=4, rank=0, world_size=2, micro_batch=4)


def test_the_batch_is_split_over_the_ranks_not_multiplied() -> None:
    two = Ranks(rank=1, world_size=2)
    assert two.split_batch(16, 4, default=lambda images: images) == (4, 2)  # 2 ranks x 4 images x 2 passes
    assert two.split_batch(16, 0, default=lambda images: images) == (8, 1)  # the device default, per rank
    with pytest.raises(ConfigError) as error:
        two.split_batch(16, 3, default=lambda images: images)
    assert error.value.field == "micro_batch_size"
    with pytest.raises(ConfigError) as error:
        Ranks(world_size=3).split_batch(16, 0, default=lambda images: images)
    assert error.value.field == "batch_size"


# ---- losses over the global batch --------------------------------------------------------------------

def _global_batch_data() -> tuple[torch.Tensor, torch.Tensor]:
    """8 samples, 3 classes: rows 0-3 (rank 0) lean to class 0, rows 4-7 (rank 1) to class 1; the teacher
    is confident on 3 of rank 0's rows and 1 of rank 1's."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=generator)
    logits[:4, 0] += 3.0
    logits[4:, 1] += 3.0
    teacher = torch.full((8, 3), 0.2)
    teacher[:, 2] = 0.6
    teacher[[0, 1, 2, 5], 0] = 0.9
    teacher[[0, 1, 2, 5], 2] = 0.0
    return logits, teacher


def _losses(logits: torch.Tensor, teacher: torch.Tensor, batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(logits, dim=-1)
    fair, _ = fairness_loss(batch.rows(probs).mean(dim=0), None, 0.0)  # type: ignore[attr-defined]
    st, _ = self_training_loss(logits, teacher, 0.8, batch)  # type: ignore[arg-type]
    return fair, st


def _losses_on_rank(rank: int, port: int, out: Path) -> None:
    ranks = _join(rank, port)
    logits, teacher = _global_batch_data()
    mine = logits[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
    fair, st = _losses(mine, teacher[4 * rank: 4 * rank + 4], ranks.batch())
    (fair + st).backward()
    local_fair, _ = _losses(mine.detach(), teacher[4 * rank: 4 * rank + 4], LOCAL_BATCH)
    torch.save({"fair": fair.detach(), "st": st.detach(), "grad": mine.grad, "local_fair": local_fair},
               out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _gather_on_rank(rank: int, port: int, out: Path) -> None:
    ranks = _join(rank, port)
    mine = torch.arange(6.0).reshape(3, 2) if rank == 0 else torch.tensor([[10.0, 11.0]])  # uneven shards
    torch.save(ranks.gather_rows(mine), out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_gathers_all_rows_in_rank_order_from_uneven_shards(tmp_path: Path) -> None:
    """What balance_init balances over: each rank classified its slice of the bucket (some unreadable)."""
    _spawn(_gather_on_rank, tmp_path)
    expected = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [10.0, 11.0]])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def test_fairness_and_means_are_over_the_global_batch_with_the_gradient_ddp_averages(tmp_path: Path) -> None:
    _spawn(_losses_on_rank, tmp_path)
    logits, teacher = _global_batch_data()
    whole = logits.clone().requires_grad_(True)
    fair, st = _losses(whole, teacher, LOCAL_BATCH)
    (fair + st).backward()
    assert whole.grad is not None
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["fair"], fair.detach())  # the same global mean on every rank
        assert abs(float(result["local_fair"]) - float(fair.detach())) > 0.1  # what a per-rank mean would have given
        # DDP averages the ranks' gradients: each rank's, / 2, is the one-process gradient of its rows.
        torch.testing.assert_close(result["grad"] / 2, whole.grad[4 * rank: 4 * rank + 4])
    # 3 + 1 confident samples: the mean over the 4, not the mean of the ranks' means (over 3 and over 1).
    torch.testing.assert_close((ranks[0]["st"] + ranks[1]["st"]) / 2, st.detach())


# ---- one optimizer step under DDP -------------------------------------------------------------------

def _step_inputs() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Two micro-batches of 8 (weak, strong, mask); each mask covers a different share of each half."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        weak = torch.randn(8, 3, 32, 32, generator=generator)
        mask = (torch.rand(8, 4, 4, generator=generator) < torch.linspace(0.1, 0.7, 8).view(8, 1, 1)).float()
        batches.append((weak, weak + 0.1 * torch.randn(8, 3, 32, 32, generator=generator), mask))
    return batches


def _must_step(base_model: str, ranks: Ranks, micro_batch: int) -> object:
    from must_engine.base_models import load_base_model
    from must_engine.models import MustModel
    from must_engine.train import MustStep
    from must_engine.zeroshot import zero_shot_classifier

    config = resolve_config(overrides={**RUN, "micro_batch_size": micro_batch, "w_align": 0.5, "tau": 0.4},
                            num_images=24, num_classes=3, geometry=ModelGeometry(image_size=32, patch_size=8))
    student = MustModel(zero_shot_classifier(load_base_model(base_model), CLASSES))
    return MustStep(student, config, total_steps=4, device=torch.device("cpu"), autocast_dtype=None, ranks=ranks)


def _steps_on_rank(rank: int, port: int, base_model: str, out: Path) -> None:
    ranks = _join(rank, port)
    step = _must_step(base_model, ranks, micro_batch=4)
    slices = [tuple(t[4 * rank: 4 * rank + 4] for t in batch) for batch in _step_inputs()]
    for index in range(2):
        step(index, iter(slices), accumulation=2)  # type: ignore[operator]
    metrics = step.report_metrics(1.0)  # type: ignore[attr-defined]
    torch.save({"student": step.student.state_dict(), "teacher": step.teacher.module.state_dict(),  # type: ignore[attr-defined]
                "metrics": metrics}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_a_ddp_step_matches_one_process_and_the_teacher_is_identical_on_every_rank(
    tiny_base_model: str, tmp_path: Path
) -> None:
    _spawn(_steps_on_rank, tiny_base_model, tmp_path)
    single = _must_step(tiny_base_model, Ranks(), micro_batch=8)
    for index in range(2):
        single(index, iter(_step_inputs()), accumulation=2)  # type: ignore[operator]
    expected = single.report_metrics(1.0)  # type: ignore[attr-defined]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][name]), f"teacher {name} differs between ranks"
    for name, value in single.teacher.module.state_dict().items():  # type: ignore[attr-defined]
        torch.testing.assert_close(ranks[0]["teacher"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("loss", "loss_st", "loss_fair", "loss_mim", "loss_align", "above_tau", "grad_norm"):
        assert ranks[0]["metrics"][name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert 0 < expected["above_tau"] < 1


# ---- whole runs: must adapt --nproc 2 ---------------------------------------------------------------

def _sets(overrides: dict[str, object]) -> list[str]:
    return [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]


def _command(base_model: str, images: Path, out: Path, nproc: int = 2) -> list[str]:
    """`must adapt` on nproc ranks, each with its share of the global micro-batch of 8."""
    return [str(MUST), "adapt", "--images", str(images), "--classes", ",".join(CLASSES), "--base-model", base_model,
            *_sets({**RUN, "micro_batch_size": 8 // nproc}), "--out", str(out), "--nproc", str(nproc), "--quiet"]


@pytest.fixture(scope="module")
def one_process(tiny_base_model: str, dtd_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, micro-batches of 8 (the 2 ranks' 2 x 4), the same global batch of 16."""
    config = resolve_job_config("auto", {**RUN, "micro_batch_size": 8}, num_images=24, num_classes=3,
                                base_model=tiny_base_model)
    out = tmp_path_factory.mktemp("one-process") / "model"
    result = adapt(dtd_subset, CLASSES, out, base_model=tiny_base_model, config=config, device="cpu")
    assert result.steps == 9
    return out


def _assert_same_model(expected: Path, got: Path) -> None:
    reference, other = load_file(str(expected / WEIGHTS_FILE)), load_file(str(got / WEIGHTS_FILE))
    assert reference.keys() == other.keys()
    for name, value in reference.items():
        if name.endswith("attn.in_proj_bias"):
            # The key bias's true gradient is exactly 0 (softmax ignores a constant shift), so AdamW turns
            # round-off in it into steps of about lr: compare the query and value parts only.
            width = value.shape[0] // 3
            value, other[name] = (torch.cat([v[:width], v[2 * width:]]) for v in (value, other[name]))
        torch.testing.assert_close(other[name], value, rtol=1e-4, atol=2e-6, msg=name)


def test_two_processes_train_the_model_one_process_trains(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path, one_process: Path
) -> None:
    from must_engine.artifact import read_metadata

    out = tmp_path / "model"
    done = subprocess.run(_command(tiny_base_model, dtd_subset, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 x cpu (gloo)" in done.stdout + done.stderr
    assert read_metadata(out)["metrics"]["steps"] == read_metadata(one_process)["metrics"]["steps"] == 9
    _assert_same_model(one_process, out)
    for name in ("loss", "loss_st", "above_tau", "agreement", "grad_norm"):
        assert read_metadata(out)["metrics"][name] == pytest.approx(read_metadata(one_process)["metrics"][name],
                                                                    rel=1e-4, abs=1e-5), name


def _rank_pid(launcher: int, rank: int) -> int | None:
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            with open(f"/proc/{child}/environ", "rb") as handle:
                if f"RANK={rank}".encode() in handle.read().split(b"\0"):
                    return int(child)
    return None


@pytest.mark.parametrize("resume_nproc", [2, 1])
def test_a_killed_rank_stops_the_run_whole_and_a_rerun_resumes_from_its_checkpoint(
    tiny_base_model: str, dtd_subset: Path, tmp_path: Path, one_process: Path, resume_nproc: int
) -> None:
    """The rerun on one process is the worker's case: a job's next attempt may land on a worker with fewer
    GPUs; the batch is global, so its checkpoint resumes there to the same model."""
    out, work = tmp_path / "model", tmp_path / "model.work"
    command = _command(tiny_base_model, dtd_subset, out)
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (work / CHECKPOINT_FILE).exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.02)
        victim = _rank_pid(first.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert first.wait(timeout=120) != 0
    checkpoint = load_checkpoint(work)
    assert checkpoint is not None and checkpoint["step"] == 5  # mid-epoch: 80 images of 24 a epoch
    assert not (out / WEIGHTS_FILE).exists(), "no artifact from a run that lost a rank"

    resumed = subprocess.run(_command(tiny_base_model, dtd_subset, out, resume_nproc), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint at step 5" in resumed.stdout + resumed.stderr
    _assert_same_model(one_process, out)
    assert not work.exists()
