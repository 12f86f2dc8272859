"""W&B as a researcher uses it: runs named and grouped by their sweep, a table of samples at every evaluation,
learning rate and gradient norm, every metric under one name and on one step axis (the iteration), and the local
files holding what W&B gets."""

import csv
import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from infalign.models.data import ASSISTANT, HUMAN
from infalign.runtime.identity import run_identity, swept_keys, with_identity
from infalign.runtime.loggers import GuardedLogger
from infalign.trainer.eval_samples import SAMPLE_COLUMNS, SAMPLES_JSONL, SAMPLES_KEY
from infalign.trainer.evaluation import WinRateCallback

SMOKE = ["scale=smoke", "progress=false"]


def offline_records(run_file: Path):
    """The protobuf records of an offline run's `.wandb` file (wandb >= 0.2x writes it from its Go core and no
    longer ships a Python reader): a 7-byte header (":W&B", magic, version), then LevelDB-log records in 32 KiB
    blocks, each `crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def offline_run(run_dir: Path) -> dict:
    """`{"name", "group", "tags", "history": [{key: value}]}` of the run's one offline W&B run."""
    [run_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    out = {"history": [], "dir": run_file.parent}
    for record in offline_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, tags=list(record.run.tags))
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
    return out


# ---------------------------------------------------------------------------------------------- name, group, tags
def _cfg(**over):
    return OmegaConf.create({"n": 4, "beta": 0.24, "seed": 0, "rl": {"algo": "rloo"}, **over})


def test_a_run_is_named_by_method_n_beta_seed_and_tagged():
    ident = run_identity(_cfg(), {"method": "bon_exp", "transform": "bon_exp", "solver": "rloo", "scale": "smoke"})
    assert ident == {"name": "bon_exp-n4-b0.24-s0", "group": None, "tags": ["bon_exp", "rloo", "n=4", "scale=smoke"]}
    # no method preset: the transform names it; a study is a tag
    ident = run_identity(_cfg(beta=0.05, seed=2, study={"name": "bon"}), {"transform": "identity", "solver": "distill"})
    assert ident["name"] == "identity-n4-b0.05-s2" and ident["tags"] == ["identity", "distill", "n=4", "study=bon"]


def test_sweep_members_share_a_group_and_are_named_apart():
    swept = swept_keys(["scale=smoke", "seed=0,1", "optimizer.lr=1e-4,1e-3", "+x=1"],
                       {"method": "bon_exp,calibrated", "study.beta_index": "range(5)", "rl.k": "4"})
    assert swept == ["seed", "optimizer.lr", "method", "study.beta_index"]  # sweeps only, in order
    ident = run_identity(_cfg(), {"method": "bon_exp"}, sweep_dir="outputs/multirun/2026-01-01_00-00-00_lr",
                         swept=swept, member_overrides=["scale=smoke", "seed=0", "optimizer.lr=1e-3", "method=bon_exp"])
    # method, beta (via study.beta_index) and seed are in the name already; the other swept key is added
    assert ident["name"] == "bon_exp-n4-b0.24-s0-optimizer.lr=1e-3"
    assert ident["group"] == "2026-01-01_00-00-00_lr"


def test_the_identity_fills_only_what_the_logger_config_leaves_open():
    ident = {"name": "bon_exp-n4-b0.24-s0", "group": "sweep", "tags": ["bon_exp", "n=4"]}
    cfg = OmegaConf.create({"_target_": "x.WandbLogger", "name": None, "group": "mine", "tags": ["paper", "n=4"]})
    assert with_identity(cfg, ident) == {"_target_": "x.WandbLogger", "name": "bon_exp-n4-b0.24-s0", "group": "mine",
                                         "tags": ["bon_exp", "n=4", "paper"]}
    other = {"_target_": "tests.fake_loggers.FailingLogger", "fail_after": 3}  # no name/group/tags: left as is
    assert with_identity(other, ident) == other


# ---------------------------------------------------------------------------------------------- samples
class TableLogger:
    def __init__(self):
        self.tables = []

    def log_table(self, key, columns, data, step=None):
        self.tables.append((key, columns, data, step))


def _sample(prompt_id: str, reward: float) -> dict:
    return {"prompt_id": prompt_id, "prompt": "Human: hi", "pick": "bon@1", "policy_response": "hello",
            "policy_tokens": 2, "policy_reward_raw": reward, "policy_reward_calibrated": 0.5,
            "reference_response": "hey", "reference_tokens": 1, "reference_reward_raw": 0.1,
            "reference_reward_calibrated": 0.25, "policy_pick_response": "hello", "policy_pick_tokens": 2,
            "policy_pick_reward_raw": reward, "policy_pick_reward_calibrated": 0.5, "reference_pick_response": "hey",
            "reference_pick_tokens": 1, "reference_pick_reward_raw": 0.1, "reference_pick_reward_calibrated": 0.25}


def test_samples_go_to_the_jsonl_file_and_the_table_and_a_repeated_evaluation_replaces_its_rows(tmp_path):
    callback = WinRateCallback([("a", "A", "A"), ("b", "B", "B")], None, [1], 1, 1, {}, tmp_path, log_samples=2)
    table, csv_like = TableLogger(), SimpleNamespace()  # a logger without tables gets none
    trainer = SimpleNamespace(loggers=[csv_like, table])

    def read():
        return [json.loads(line) for line in (tmp_path / SAMPLES_JSONL).read_text().splitlines()]

    callback.sample_rows = [_sample("a", 1.0), _sample("b", 2.0)]
    callback._write_samples(trainer, iteration=2, step=4)
    callback.sample_rows = [_sample("a", 3.0), _sample("b", 4.0)]
    callback._write_samples(trainer, iteration=4, step=8)
    assert [(r["iteration"], r["prompt_id"], r["policy_reward_raw"]) for r in read()] == \
           [(2, "a", 1.0), (2, "b", 2.0), (4, "a", 3.0), (4, "b", 4.0)]
    assert all(list(r) == list(SAMPLE_COLUMNS) for r in read())
    key, columns, data, step = table.tables[-1]
    assert key == SAMPLES_KEY and columns == list(SAMPLE_COLUMNS) and step == 4  # at the iteration, like the metrics
    assert data[0] == [4, 8, "a", "Human: hi", "bon@1", "hello", 2, 3.0, 0.5, "hey", 1, 0.1, 0.25,
                       "hello", 2, 3.0, 0.5, "hey", 1, 0.1, 0.25]
    # a resumed run evaluates iteration 4 again (the dead run wrote it after its last checkpoint): replaced
    callback.sample_rows = [_sample("a", 5.0)]
    callback._write_samples(trainer, iteration=4, step=8)
    assert [(r["iteration"], r["policy_reward_raw"]) for r in read()] == [(2, 1.0), (2, 2.0), (4, 5.0)]


def test_the_guarded_logger_passes_tables_on_only_to_a_logger_that_has_them():
    inner = TableLogger()
    GuardedLogger(inner).log_table(key="k", columns=["a"], data=[[1]], step=3)
    assert inner.tables == [("k", ["a"], [[1]], 3)]
    GuardedLogger(SimpleNamespace()).log_table(key="k", columns=["a"], data=[[1]])  # nothing to call: no error


# ---------------------------------------------------------------------------------------------- end to end
def test_an_offline_wandb_sweep_is_grouped_named_and_shows_samples(run_train, tmp_path):
    sweep = tmp_path / "sweep_lr"
    out = run_train("-m", *SMOKE, "logger=wandb", "seed=0,1", "rl.iterations=2", "eval.every=1",
                    "eval.log_samples=3", f"hydra.sweep.dir={sweep}")
    assert "anonymous" not in out.stdout + out.stderr  # wandb's warning about the anonymous=None Lightning passes
    for seed in (0, 1):
        run_dir = sweep / str(seed)
        wb = offline_run(run_dir)
        # named, grouped by the sweep, tagged
        assert wb["name"] == f"bon_exp-n4-b0.1-s{seed}" and wb["group"] == "sweep_lr"
        assert {"bon_exp", "rloo", "n=4", "scale=smoke"} <= set(wb["tags"])
        # the samples: eval_samples.jsonl, the first 3 eval prompts at each of the 2 evaluations
        rows = [json.loads(line) for line in (run_dir / SAMPLES_JSONL).read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1, 1, 1, 2, 2, 2] and all(list(r) == list(SAMPLE_COLUMNS) for r in rows)
        per_prompt = [r["prompt_id"] for r in rows]
        assert per_prompt[:3] == per_prompt[3:] and len(set(per_prompt)) == 3  # the same prompts every time
        assert [r["reference_response"] for r in rows[:3]] == [r["reference_response"] for r in rows[3:]]  # cached
        for r in rows:
            assert r["prompt"] and isinstance(r["policy_response"], str) and isinstance(r["reference_response"], str)
            assert all(math.isfinite(r[k]) for k in ("policy_reward_raw", "reference_reward_raw"))
            assert 0 <= r["policy_reward_calibrated"] <= 1 and 0 <= r["reference_reward_calibrated"] <= 1
            # the prompt starts at a turn, or after "…" at a whole word (the smoke prompts are cut mid-turn)
            assert r["prompt"].startswith((HUMAN, ASSISTANT, "…")) and not r["prompt"].startswith("… ")
            # the run's best-of-4 pick among the first 4 samples, which hold the first sample shown
            assert r["pick"] == "bon@4"
            for side in ("policy", "reference"):
                assert r[f"{side}_pick_reward_raw"] >= r[f"{side}_reward_raw"]
                assert all(1 <= r[f"{side}{p}_tokens"] <= 16 for p in ("", "_pick"))  # generation.max_new_tokens
        # ... and the W&B table, one per evaluation, with the same rows
        logged = [h for h in wb["history"] if f"{SAMPLES_KEY}/path" in h]
        assert len(logged) == 2
        for h, at in zip(logged, (rows[:3], rows[3:])):
            assert h[f"{SAMPLES_KEY}/_type"] == "table-file" and h[f"{SAMPLES_KEY}/nrows"] == 3
            table = json.loads((wb["dir"] / "files" / h[f"{SAMPLES_KEY}/path"]).read_text())
            assert table["columns"] == list(SAMPLE_COLUMNS)
            assert table["data"] == [[r[c] for c in SAMPLE_COLUMNS] for r in at]
        # every metric under one name; the learning rate and the gradient norm among them
        with open(run_dir / "logs" / "metrics.csv", newline="") as f:
            reader = csv.DictReader(f)
            metrics, columns = list(reader), set(reader.fieldnames)
        with open(run_dir / "eval_metrics.csv", newline="") as f:
            evals = list(csv.DictReader(f))
        # one step axis, the iteration, for all W&B logs: a training row at the iterations its policy has had (0, 1),
        # an evaluation and its table at the iterations before it (1, 2); the optimizer step beside it, that of
        # the policy each row measures (2 per iteration: 4 prompts x k=4 in minibatches of 8)
        history = wb["history"]
        axis = [h["trainer/global_step"] for h in history]
        assert axis == sorted(axis)
        train = [h for h in history if "train/kl/k1" in h]
        evaluated = [h for h in history if "eval/kl" in h]
        tables = [h for h in history if f"{SAMPLES_KEY}/path" in h]
        assert [h["trainer/global_step"] for h in train] == [0, 1]
        assert [h["trainer/global_step"] for h in evaluated] == [h["trainer/global_step"] for h in tables] == \
               [int(r["iteration"]) for r in evals] == [1, 2]
        assert [h["optimizer_step"] for h in train] == [0, 2]
        assert [h["optimizer_step"] for h in evaluated] == [int(r["step"]) for r in evals] == [2, 4]
        # ... and logs/metrics.csv, the same axis
        steps = [int(r["step"]) for r in metrics]
        assert steps == sorted(steps) and [int(r["step"]) for r in metrics if r["eval/kl"]] == [1, 2]
        assert [int(r["step"]) for r in metrics if r["train/kl/k1"]] == [0, 1]
        # the mean response length of policy and reference beside the win rates: every evaluation, the final one
        final = json.loads((run_dir / "final_metrics.json").read_text())
        for key in ("eval/response_tokens", "eval/reference_response_tokens"):
            assert 1 <= final[key] <= 16 and final[key] == float(evals[-1][key]) and all(key in h for h in evaluated)
        assert len({r["eval/reference_response_tokens"] for r in evals}) == 1  # the same cached samples each time
        assert "kl" not in columns and "reward" not in columns  # only train/kl/k1, train/reward/calibrated
        assert {"train/kl/k1", "train/reward/calibrated", "train/lr", "train/grad/norm"} <= columns
        lrs = [float(r["train/lr"]) for r in metrics if r["train/lr"]]
        norms = [float(r["train/grad/norm"]) for r in metrics if r["train/grad/norm"]]
        assert lrs == [1e-4, 1e-4]  # the solver's optimizer.lr (rloo: train.yaml's), constant schedule: each iteration's
        assert len(norms) == 2 and all(math.isfinite(x) and x > 0 for x in norms)
        # what W&B got, the local file has: the same metric keys, no others
        wandb_keys = {k for h in wb["history"] for k in h
                      if not k.startswith(("_", f"{SAMPLES_KEY}/")) and k != "trainer/global_step"}
        assert wandb_keys == columns - {"step"}
        hparams = OmegaConf.load(run_dir / "logs" / "hparams.yaml")
        assert hparams.run_name == wb["name"] and hparams.run_group == wb["group"]


def test_gradient_norm_is_the_total_norm_clipping_sees():
    import torch

    from infalign.trainer.module import gradient_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 1, bias=False))
    net(torch.randn(3, 5)).sum().backward()
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]))
    assert abs(gradient_norm(net) - expected) <= 1e-6 * expected and expected > 0
    assert gradient_norm(torch.nn.Linear(2, 2)) == 0.0  # no gradients yet
