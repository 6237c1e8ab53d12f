"""All groups of a study in one search: shared slots, per-group ASHA and Optuna, the teacher
as a Ray task, the console, settings precedence, and the scheduler benchmark's arithmetic.

The slow tests start real Ray on loopback addresses and stop every process by process id.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import secrets
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")  # every test here needs Ray and Optuna (the device image has neither)
pytest.importorskip("optuna")

import optuna
import pandas as pd
from helpers import TINY, env, kdsearch, kill_tree, ray_cluster, run, tiny, write_toml

from search.bench.scheduler import simulate_schedule, slot_usage
from search.commands.cli import build_parser
from search.engine.progress import StudyProgress, group_counts
from search.engine.scheduler import GroupASHA
from search.store.sink import read_table
from search.study import environment_settings, load_study_config, overrides_from_args

# ---------------------------------------------------------------------------------------------
# Per-group ASHA


def _trial(trial_id: str, group: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"group": group})


def test_group_asha_ranks_a_trial_only_against_its_own_group(tmp_path):
    config = tiny(tmp_path, groups=["baseline", "kd", "at"], max_epochs=8, grace_period=1)
    asha = GroupASHA(config)
    at = [_trial(f"at{i}", "at") for i in range(3)]
    kd = [_trial(f"kd{i}", "kd") for i in range(2)]
    base = _trial("b0", "baseline")
    for t in (*at, *kd, base):
        asha.on_trial_add(None, t)
    results = [asha.on_trial_result(None, t, {"epoch": 1, "val_acc": acc})
               for t, acc in zip(at, (0.9, 0.8, 0.87), strict=True)]
    # 0.8 is below 0.85, the median of {0.9, 0.8}; 0.87 is above it
    assert results == ["CONTINUE", "STOP", "CONTINUE"]
    # kd's first trial is far below every at trial: in its own group it is the only one yet
    assert asha.on_trial_result(None, kd[0], {"epoch": 1, "val_acc": 0.3}) == "CONTINUE"
    assert asha.on_trial_result(None, kd[1], {"epoch": 1, "val_acc": 0.2}) == "STOP"
    # the baseline's seeds are never stopped
    assert asha.on_trial_result(None, base, {"epoch": 1, "val_acc": 0.0}) == "CONTINUE"


def test_shared_queue_keeps_more_slots_busy_than_groups_in_turn(tmp_path):
    config = tiny(tmp_path, groups=["baseline", "kd", "fa", "at", "combined"], samples=12,
                  max_epochs=12, grace_period=2)
    shared = simulate_schedule(config, 16, shared=True)
    in_turn = simulate_schedule(config, 16, shared=False)
    assert shared["trials"] == in_turn["trials"] == 60
    assert shared["busy_slot_s"] == shared["epochs"]  # 1 s epochs
    assert 0 < in_turn["utilization"] < shared["utilization"] <= 1
    assert shared["span_s"] < in_turn["span_s"]


def test_slot_usage_matches_a_hand_computed_timeline():
    # 2 slots; trial a: epochs [0,2] [2,4]; trial b: [1,2]; trial c (last to start): [3,5].
    rows = pd.DataFrame({
        "trial_id": ["a", "a", "b", "c"], "group": ["kd", "kd", "at", "at"],
        "timestamp": [102.0, 104.0, 102.0, 105.0], "epoch_seconds": [2.0, 2.0, 1.0, 2.0]})
    usage = slot_usage(rows, slots=2)
    assert usage["span_s"] == 5.0 and usage["busy_slot_s"] == 7.0
    assert usage["utilization"] == pytest.approx(0.7)
    # after c starts at t=103: [103,104] both busy, [104,105] one idle -> 1 slot-second
    assert usage["tail_idle_slot_s"] == pytest.approx(1.0)
    # idle before: [100,101] one slot, [102,103] one slot -> 2 slot-seconds over 3 trials
    assert usage["overhead_per_trial_s"] == pytest.approx(2.0 / 3)
    assert usage["groups_interleave"]


# ---------------------------------------------------------------------------------------------
# Console and settings


def test_progress_view_counts_each_group(tmp_path):
    config = tiny(tmp_path, groups=["kd", "at"], samples=4, max_epochs=3)

    def t(group, status, **result):
        return SimpleNamespace(config={"group": group}, status=status, last_result=result)

    trials = [t("kd", "RUNNING", best_val_acc=0.4, epoch=1),
              t("kd", "TERMINATED", best_val_acc=0.6, epoch=3, epochs_run=3, wall_seconds=30),
              t("kd", "TERMINATED", best_val_acc=0.2, epoch=1, epochs_run=1, wall_seconds=10),
              t("at", "ERROR"), t("at", "PENDING")]
    counts = group_counts(trials, config)
    assert {k: counts["kd"][k] for k in ("running", "done", "stopped", "failed", "to_start")} == \
        {"running": 1, "done": 1, "stopped": 1, "failed": 0, "to_start": 1}
    assert counts["kd"]["best"] == 0.6 and math.isnan(counts["at"]["best"])
    assert counts["at"]["failed"] == 1 and counts["at"]["to_start"] == 3
    text = StudyProgress(config, slots=2).render(trials)
    assert "left, 2 slots" in text  # (1 + 0.5) kd + 3 at trials of 20 s each on 2 slots
    assert any(line.split()[:6] == ["kd", "1", "1", "1", "0", "1"] for line in text.splitlines())


def _resolved(argv: list[str], environ: dict[str, str]):
    args = build_parser().parse_args(argv)
    return load_study_config(args.preset, args.config, overrides_from_args(args),
                             environment_settings(environ))


def test_flag_beats_file_beats_environment_beats_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEARCH_DATA", "synthetic:7")  # also the parser's default for --data
    environ = {"KDSEARCH_DATA": "synthetic:7", "KDSEARCH_STORAGE": str(tmp_path / "env")}
    toml = write_toml(tmp_path / "c.toml", {"data": "synthetic:40"})
    base = ["tune", "--preset", "smoke", "--study", "p"]
    assert _resolved(base, environ).data == "synthetic:7"  # environment over preset
    assert _resolved(base, environ).storage == str(tmp_path / "env")
    assert _resolved(base, {}).data == "cifar10"  # the preset's (default) data
    assert _resolved([*base, "--config", str(toml)], environ).data == "synthetic:40"  # file
    flagged = [*base, "--config", str(toml), "--data", "synthetic:9"]
    assert _resolved(flagged, environ).data == "synthetic:9"  # flag over everything


# ---------------------------------------------------------------------------------------------
# Real searches


@pytest.mark.slow
def test_five_groups_share_one_search_and_optuna_hears_the_truth(tmp_path):
    settings = {**TINY, "study": "all", "groups": ["baseline", "kd", "fa", "at", "combined"],
                "samples": 3, "max_epochs": 3, "grace_period": 1}
    cfg = write_toml(tmp_path / "all.toml", settings)
    store = tmp_path / "store"
    done = run(kdsearch("tune", "--config", str(cfg), "--storage", str(store)), 600,
               env=env(RAY_AUTH_MODE=None))
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "Traceback" not in console and "SystemExit" not in console, console[-3000:]
    assert "Token authentication" not in console  # the private instance keeps it, quietly
    assert "InvalidAuthToken" not in console
    assert "group     running  done  stopped" in done.stdout
    study_dir = str(store / "all")
    trials, epochs = read_table(study_dir, "trials"), read_table(study_dir, "epochs")
    assert trials.groupby("group").size().to_dict() == {g: 3 for g in settings["groups"]}
    # the groups ran at the same time: every group's epochs overlap every other group's
    end = epochs.timestamp
    start = end - epochs.epoch_seconds
    windows = [(start[epochs.group == g].min(), end[epochs.group == g].max())
               for g in settings["groups"]]
    assert all(a0 < b1 and b0 < a1 for a0, a1 in windows for b0, b1 in windows)
    assert (trials.loc[trials.group == "baseline", "status"] == "completed").all()
    # Optuna: one study per tuned group, each trial in the state the trials table implies
    storage = f"sqlite:///{store / 'all' / 'optuna.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"kd", "fa", "at", "combined"}
    state = {"completed": "COMPLETE", "asha_stopped": "PRUNED"}
    for group in names:
        study = optuna.load_study(study_name=group, storage=storage)
        rows = trials[trials.group == group].set_index("trial_id")
        assert sorted(t.user_attrs["trial_id"] for t in study.trials) == sorted(rows.index)
        for t in study.trials:
            row = rows.loc[t.user_attrs["trial_id"]]
            assert t.state.name == state[row.status] and t.user_attrs["status"] == row.status
            curve = epochs[epochs.trial_id == row.name].set_index("epoch").val_acc
            assert t.intermediate_values == pytest.approx(curve.to_dict())
            if row.status == "completed":
                assert t.value == pytest.approx(row.best_val_acc)
            for p, v in t.params.items():
                assert row[f"cfg_{p}"] == pytest.approx(v)
    assert (trials.status == "asha_stopped").any()


def _train_teacher(storage: str, queue) -> None:
    from search.engine.teacher_task import train_and_store

    config = tiny_config(storage)
    queue.put(train_and_store(config, config.load_data())["trained"])


def tiny_config(storage: str):
    return load_study_config(None, None, {**TINY, "storage": storage, "groups": ["kd"]})


def test_a_cpu_only_teacher_takes_the_largest_node_and_a_gpu_teacher_one_trial(tmp_path):
    from search.engine.teacher_task import teacher_cpus

    cpu_only = tiny_config(str(tmp_path))  # 1 CPU, 0 GPUs per trial
    assert teacher_cpus(cpu_only, [0.0, 2.0, 16.5]) == 16
    assert teacher_cpus(cpu_only, []) == 1.0
    gpu = load_study_config(None, None, {**TINY, "storage": str(tmp_path), "groups": ["kd"],
                                         "cpus_per_trial": 4.0, "gpus_per_trial": 1.0})
    assert teacher_cpus(gpu, [0.0, 64.0]) == 4.0


@pytest.mark.slow
def test_two_studies_needing_one_teacher_train_it_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train_teacher, args=(str(tmp_path), queue)) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        trained = sorted(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    finally:  # a hung or failed child is killed, with anything it started
        kill_tree([p.pid for p in procs if p.pid is not None and p.is_alive()])
        for p in procs:
            if p.pid is not None:
                p.join(timeout=30)
    assert trained == [False, True]
    assert len(list((tmp_path / "teachers").glob("teacher-*.pt"))) == 1


@pytest.mark.slow
def test_teacher_trains_on_the_worker_when_the_head_offers_no_cpu(tmp_path):
    with ray_cluster(workers=("127.0.0.3",), head_cpus=0) as cluster:
        cfg = write_toml(tmp_path / "t.toml", {**TINY, "study": "t", "groups": ["kd"]})
        done = run(kdsearch("teacher", "--config", str(cfg), "--storage", str(tmp_path / "store"),
                            "--address", cluster["address"]), 300, env=env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained on 127.0.0.3" in done.stdout, done.stdout[-2000:]
    assert len(list((tmp_path / "store" / "teachers").glob("teacher-*.pt"))) == 1


# ---------------------------------------------------------------------------------------------
# Token authentication (docs/SEARCH.md, "Running on a cluster")

JOIN = """
import sys
from search.engine.ray_start import init_ray
try:
    init_ray(None, sys.argv[1])
except ValueError as exc:
    sys.exit(f"REFUSED {exc}")
import ray
@ray.remote(num_cpus=1)
def where(i):
    import time
    time.sleep(1)
    return ray.util.get_node_ip_address()
print("NODES", sorted(set(ray.get([where.remote(i) for i in range(6)]))))
"""


@pytest.mark.slow
def test_a_token_cluster_is_joined_with_the_token_found_and_refused_in_one_line(tmp_path):
    """Nodes started with RAY_AUTH_MODE=token and the token in ~/.ray/auth_token (a private
    HOME): a driver whose ~/.ray/auth_token or RAY_AUTH_TOKEN holds it joins with
    RAY_AUTH_MODE unset and runs tasks on both nodes; one without it is refused in one
    line that names authentication and the fix, with none of Ray's retry warnings."""
    token = secrets.token_hex(32)
    home, bare = tmp_path / "home", tmp_path / "bare"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    bare.mkdir()
    nodes = {"HOME": str(home), "RAY_AUTH_MODE": "token"}
    with ray_cluster(workers=("127.0.0.3",), extra_env=nodes) as cluster:
        address = cluster["address"]
        for how, driver in (("token file", {"HOME": str(home)}),
                            ("RAY_AUTH_TOKEN", {"HOME": str(bare), "RAY_AUTH_TOKEN": token})):
            joined = run([sys.executable, "-c", JOIN, address], 180,
                         env=env(RAY_AUTH_MODE=None, **driver))
            assert joined.returncode == 0, (how, joined.stdout[-2000:] + joined.stderr[-3000:])
            assert "NODES ['127.0.0.2', '127.0.0.3']" in joined.stdout, (how, joined.stdout)
        cfg = write_toml(tmp_path / "t.toml", {**TINY, "study": "t", "groups": ["baseline"]})
        refused = run(kdsearch("tune", "--config", str(cfg), "--storage", str(tmp_path / "s"),
                               "--address", address), 300,
                      env=env(RAY_AUTH_MODE=None, HOME=str(bare)))
    lines = [x for x in refused.stderr.splitlines() if x.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert lines[0].startswith("kdsearch tune: error: address: token authentication failed")
    assert "this driver has no token" in lines[0], lines[0]
    assert "RAY_AUTH_TOKEN" in lines[0] and "~/.ray/auth_token" in lines[0], lines[0]
    assert "InvalidAuthToken" not in refused.stdout + refused.stderr
    assert not (bare / ".ray").exists()  # the refused driver wrote no token either


@pytest.mark.slow
def test_a_private_ray_instance_writes_no_token_to_home(tmp_path):
    """kdsearch's private Ray keeps token authentication on (its ports listen on every
    interface) but leaves no ~/.ray/auth_token, which would turn authentication on for this
    user's next `ray start --head` and lock out workers started without a token."""
    home = tmp_path / "home"
    home.mkdir()
    script = (
        "import os\n"
        "from search.commands.tune import init_ray\n"
        "init_ray(None, num_cpus=1)\n"
        "import ray\n"
        "one = ray.get(ray.remote(lambda: 1).remote())\n"
        "print('MODE', os.environ.get('RAY_AUTH_MODE'), 'TASK', one)\n")
    done = run([sys.executable, "-c", script], 180, env=env(RAY_AUTH_MODE=None, HOME=str(home)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "MODE token TASK 1" in done.stdout, done.stdout
    assert "Token authentication" not in done.stderr, done.stderr[-2000:]
    assert not (home / ".ray" / "auth_token").exists()
