"""benchmarks/study.py end to end on mock data: runs, measures and writes RESULTS.md; and
benchmarks/lr_choice.py on fabricated studies."""
import fractions
import json
import os

from absl import app, flags
import pytest
import tensorflow_datasets as tfds

from benchmarks import lr_choice, study
from bsparse import finetune


@pytest.fixture
def study_flags():
  yield flags.FLAGS
  flags.FLAGS.unparse_flags()


def run_tiny_study(tmp_path, *flag_args):
  """``benchmarks.study`` of a small MLP at density 0.5, seed 0, rank 2, trained in this
  process on 48 mock examples (32 to train: 4 steps an epoch), plus ``flag_args``. Its
  callers take the ``study_flags`` fixture, which resets the flags afterwards."""
  flags.FLAGS([
      "study", f"--out={tmp_path / 'runs'}", "--models=mlp", "--densities=0.5", "--seeds=0",
      "--ranks=2", f"--results={tmp_path / 'RESULTS.md'}", f"--plots_dir={tmp_path / 'plots'}",
      "--latency_batch=8", "--in_process", "--override=dataset.source='tfds'",
      "--override=dataset.val_size=16", "--override=batch_size=8",
      "--override=eval_batch_size=16", "--override=model_kwargs.hidden=(40,20)",
      "--override=plots=False", *flag_args])
  with tfds.testing.mock_data(num_examples=48):
    study.main([])


def test_study_runs_end_to_end_on_a_tiny_budget(tmp_path, study_flags):
  out, results = tmp_path / "runs", tmp_path / "RESULTS.md"
  run_tiny_study(tmp_path, "--methods=gradual", "--epochs=2", "--override=log_every_steps=2")
  rows = list(json.loads((out / "study.json").read_text())["runs"].values())
  labels = {r["label"] for r in rows}
  assert labels == {"dense", "kpd r2", "kpd r2 +bsr", "gradual", "fixed 28x10",
                    "fixed 14x10", "fixed 28x20", "select"}
  by = {r["label"]: r for r in rows}
  assert by["gradual"]["density"] == pytest.approx(0.5, abs=0.02)
  assert by["kpd r2"]["flops"] < by["gradual"]["flops"] == pytest.approx(by["dense"]["flops"])
  assert by["select"]["chosen"]["fc1"] in ([28, 10], [14, 10], [28, 20])
  assert all(r["step_mb"] > r["state_mb"] > 0 for r in rows)
  assert set(by["kpd r2"]["latency_ms"]) == {"dense", "kpd", "bsr"}
  # After its switch the +bsr run pays nnz*bm*bn per position: at density 0.5 about half
  # of dense for the sparse layers, whatever the rank.
  assert by["kpd r2 +bsr"]["density"] == pytest.approx(0.5, abs=0.02)
  assert by["kpd r2 +bsr"]["flops"] < by["dense"]["flops"]
  assert set(by["kpd r2 +bsr"]["latency_ms"]) == {"dense", "bsr"}
  text = results.read_text()
  assert "| gradual | 0.5 |" in text and "one-run selection" in text
  assert "| kpd r2 +bsr | 0.5 |" in text and "kpd r2 +bsr at density 0.5" in text
  assert "peak RSS below" not in text  # runs in this process have no RSS of their own
  glance = text[text.index("## Targets at a glance"):text.index("## mlp")]
  assert "| mlp | 2 epochs | kpd r2 at density 0.5: within 1.0 point of dense |" in glance
  assert "| mlp | 2 epochs | selection, seed 0: training FLOPs ≤ 1.5x that fixed run |" in glance
  assert os.path.exists(tmp_path / "plots" / "mlp_accuracy.png")
  assert os.path.exists(tmp_path / "plots" / "mlp_step_times.png")
  assert os.path.exists(tmp_path / "plots" / "mlp_fc1_sweep.png")
  assert "(plots/mlp_fc1_sweep.png)" in text
  assert "(plots/mlp_step_times.png)" in text
  trace = by["gradual"]["step_ms_trace"]  # a window every 2 steps (log_every_steps=2)
  assert [t for t, _ in trace[:2]] == [2, 4] and all(ms > 0 for _, ms in trace)
  assert "Reproduce with `python -m benchmarks.study" in text
  # A finished run is not trained again (an interrupted study resumes).
  summary = out / "mlp" / "dense_d1_s0" / "summary.json"
  mtime = os.path.getmtime(summary)
  dense = next(r for r in study.plan(["mlp"], [0.5], [0], [2], [], 2.0, False, 0.5)
               if r.label == "dense")
  study.execute(dense, str(out))
  assert os.path.getmtime(summary) == mtime


def test_plan_without_dense_has_only_the_other_rows():
  runs = study.plan(["cnn"], [0.1], [0, 1], [4], ["gradual"], 6.0, False, 0.25, dense=False)
  assert sorted((r.method, r.seed) for r in runs) == [
      ("gradual", 0), ("gradual", 1), ("kpd", 0), ("kpd", 1)]
  assert len(study.plan(["cnn"], [0.1], [0], [4], ["gradual"], 6.0, False, 0.25)) == 3


def test_plan_has_a_kpd_row_per_factor_step_multiplier():
  runs = study.plan(["cnn"], [0.1], [0], [4], [], 6.0, False, 0.25, ("bsr",), ("cubic",),
                    (1.0, 3.0))
  kpd = {r.label: dict(r.overrides) for r in runs if r.method == "kpd"}
  assert set(kpd) == {"kpd r4 +bsr cubic", "kpd r4 +bsr cubic, factors lr×3"}
  assert kpd["kpd r4 +bsr cubic, factors lr×3"]["optimizer.factor_lr_scale"] == 3.0
  assert kpd["kpd r4 +bsr cubic"]["optimizer.factor_lr_scale"] == 1.0
  assert len({r.name for r in runs}) == len(runs) == 3  # dense and the two KPD rows


def test_plan_has_a_kpd_row_per_mask_freeze_point():
  runs = study.plan(["cnn"], [0.1], [0], [4], ["gradual"], 6.0, False, 0.25, ("bsr",),
                    ("cubic",), (1.0,), (fractions.Fraction(1, 3), fractions.Fraction(1, 2)))
  kpd = {r.label: dict(r.overrides) for r in runs if r.method == "kpd"}
  assert set(kpd) == {"kpd r4 +bsr cubic", "kpd r4 +bsr cubic, mask fixed at 1/2"}
  assert kpd["kpd r4 +bsr cubic"]["sparsity.freeze_epoch"] == 2.0
  assert kpd["kpd r4 +bsr cubic, mask fixed at 1/2"]["sparsity.freeze_epoch"] == 3.0
  gradual = next(dict(r.overrides) for r in runs if r.method == "gradual")
  assert gradual["baseline.end_epoch"] == 3.0  # where gradual pruning fixes its mask
  for r in runs:  # each key once: the command line has no conflicting duplicates
    assert len({k for k, _ in r.overrides}) == len(r.overrides)


def test_plan_has_a_kpd_row_per_penalty_strength():
  runs = study.plan(["mlp"], [0.1], [0], [4], [], 6.0, False, 0.25, lams=(0.0, 2e-3))
  kpd = {r.label: dict(r.overrides) for r in runs if r.method == "kpd"}
  assert set(kpd) == {"kpd r4, lam 0", "kpd r4, lam 0.002"}
  assert kpd["kpd r4, lam 0"]["sparsity.lam"] == 0.0
  assert kpd["kpd r4, lam 0.002"]["sparsity.lam"] == 2e-3
  default = study.plan(["mlp"], [0.1], [0], [4], [], 6.0, False, 0.25)
  assert "sparsity.lam" not in dict(next(r for r in default if r.method == "kpd").overrides)


def test_plan_has_an_early_switch_row_per_fraction_for_bsr_cubic_rows_only():
  quarter = fractions.Fraction(1, 4)
  runs = study.plan(["cnn"], [0.1], [0], [4], [], 6.0, False, 0.25, finetunes=("kpd", "bsr"),
                    prunes=("once", "cubic"), switches=(None, quarter))
  kpd = {r.label: dict(r.overrides) for r in runs if r.method == "kpd"}
  assert set(kpd) == {"kpd r4", "kpd r4 cubic", "kpd r4 +bsr", "kpd r4 +bsr cubic",
                      "kpd r4 +bsr cubic, switch at 1/4"}
  assert kpd["kpd r4 +bsr cubic, switch at 1/4"]["sparsity.switch_epoch"] == 1.5
  assert "sparsity.switch_epoch" not in kpd["kpd r4 +bsr cubic"]


def test_plan_has_a_repacking_row_per_switch_and_interval():
  quarter = fractions.Fraction(1, 4)
  runs = study.plan(["cnn"], [0.1], [0], [4], [], 6.0, False, 0.25, finetunes=("bsr",),
                    prunes=("cubic",), switches=(None, quarter), repacks=(0, 100))
  kpd = {r.label: dict(r.overrides) for r in runs if r.method == "kpd"}
  # Repacks follow an early switch only: no ', repacks' row without one.
  assert set(kpd) == {"kpd r4 +bsr cubic", "kpd r4 +bsr cubic, switch at 1/4",
                      "kpd r4 +bsr cubic, switch at 1/4, repacks every 100 steps"}
  repacking = kpd["kpd r4 +bsr cubic, switch at 1/4, repacks every 100 steps"]
  assert repacking["sparsity.repack_every_steps"] == 100
  assert repacking["sparsity.switch_epoch"] == 1.5
  assert "sparsity.repack_every_steps" not in kpd["kpd r4 +bsr cubic, switch at 1/4"]


def test_switch_fractions_that_cannot_apply_are_refused_with_the_fix():
  third, quarter = fractions.Fraction(1, 3), fractions.Fraction(1, 4)
  study.check_switches([], [third], ["kpd"], ["once"])  # no switch: nothing to check
  study.check_switches([quarter], [third], ["bsr"], ["cubic"])
  with pytest.raises(app.UsageError, match="add bsr to --finetune and cubic to --prune"):
    study.check_switches([quarter], [third], ["bsr"], ["once"])
  with pytest.raises(app.UsageError, match=r"--switch_fractions=1/2: .* \[1/12, 1/3\)"):
    study.check_switches([fractions.Fraction(1, 2)], [third, fractions.Fraction(1, 2)],
                         ["bsr"], ["cubic"])
  with pytest.raises(app.UsageError, match="--switch_fractions=1/24"):
    study.check_switches([fractions.Fraction(1, 24)], [third], ["bsr"], ["cubic"])
  study.check_switches([], [third], ["bsr"], ["cubic"], [0])  # 0: no repacks
  with pytest.raises(app.UsageError, match="add --switch_fractions"):
    study.check_switches([], [third], ["bsr"], ["cubic"], [0, 100])


def test_plan_sweeps_the_layer_asked_for_and_refuses_one_without_sizes():
  first = study.plan(["cnn"], [], [0], [4], [], 2.0, True, 0.25, dense=False)
  assert [r.label for r in first] == ["fixed 16x16", "fixed 8x8", "fixed 32x16", "select"]
  runs = study.plan(["cnn"], [], [0], [4], [], 2.0, True, 0.25, dense=False,
                    sweep_layer="conv2")
  assert [r.label for r in runs] == ["fixed conv2 4x4", "fixed conv2 2x2", "fixed conv2 8x8",
                                     "select conv2"]
  shapes = [dict(r.overrides)["layers.block_shapes.conv2"] for r in runs]
  assert shapes == [(4, 4), (2, 2), (8, 8), ((4, 4), (2, 2), (8, 8))]
  assert not {r.name for r in runs} & {r.name for r in first}  # one --out holds both
  assert [study.sweep_layer_of(r.label) for r in first + runs] == [""] * 4 + ["conv2"] * 4
  study.check_sweep_layer(["mlp", "cnn"], "")
  with pytest.raises(app.UsageError, match="the mlp sweep varies one of fc1"):
    study.check_sweep_layer(["cnn", "mlp"], "conv2")


def test_sweep_summaries_check_each_layer_against_its_own_fixed_runs():
  def row(label, accuracy, chosen=None):
    return {"model": "cnn", "label": label, "seed": 0, "accuracy": accuracy,
            "flops": 1e12, "wall_s": 100.0, **({"chosen": chosen} if chosen else {})}

  results = [row("fixed 16x16", 0.90), row("fixed 8x8", 0.91),
             row("select", 0.91, {"fc1": [8, 8]}),
             row("fixed conv2 4x4", 0.88), row("fixed conv2 2x2", 0.92),
             row("select conv2", 0.90, {"conv2": [4, 4]})]
  summaries = {layer: (table, checks) for layer, table, checks in
               study.sweep_summaries(results, "cnn")}
  assert set(summaries) == {"", "conv2"}
  assert "fixed conv2" not in summaries[""][0] and "fixed 8x8" not in summaries["conv2"][0]
  met = {target: (measured, ok) for checks in (summaries[""][1], summaries["conv2"][1])
         for target, measured, ok in checks}
  first = "selection, seed 0: its size's fixed run within 0.5 points of the best fixed size"
  assert met[first] == ("chose 8x8, 0.00 below 8x8", True)
  conv2 = first.replace("selection,", "selection of conv2,")
  assert met[conv2] == ("chose 4x4, 4.00 below 2x2", False)
  # A study of sweeps alone has no main table or plot, only the sweeps' own tables.
  assert study.model_section(results, "cnn", "plots", "plots", "cnn_accuracy.png") == []
  assert study.rows_of(results, "cnn", sweep=True) == results


def test_study_measures_an_early_switch_row(tmp_path, study_flags):
  out = tmp_path / "runs"
  run_tiny_study(tmp_path, "--methods=", "--finetune=bsr", "--prune=cubic",
                 "--switch_fractions=1/4", "--nosweep", "--override=sparsity.prune_every_steps=1")
  by = {r["label"]: r for r in json.loads((out / "study.json").read_text())["runs"].values()}
  early = by["kpd r2 +bsr cubic, switch at 1/4"]
  assert early["density"] == pytest.approx(0.5, abs=0.02)
  # Epochs of 4 steps: the switch at epoch 1.5 (after step 6) stores more blocks than the
  # repack at the freeze, epoch 2 (after step 8).
  workdir = out / "mlp" / "kpd_r2_bsr_cubic_switch_at_1_4_d0.5_s0"
  first, second = finetune.load_switches(str(workdir))
  assert (first.step, second.step) == (7, 9)
  assert sum(v["nnz"] for v in first.layers.values()) > sum(
      v["nnz"] for v in second.layers.values())
  assert set(by) == {"dense", "kpd r2 +bsr cubic, switch at 1/4"}  # the listed rows only
  assert 0 < early["flops"] < by["dense"]["flops"]
  assert "--switch_fractions=1/4" in json.loads((out / "study.json").read_text())[
      "invocations"]["mlp"][0]


def test_plan_has_a_kpd_row_per_penalty():
  runs = study.plan(["mlp"], [0.1], [0], [4], [], 6.0, False, 0.25,
                    penalties=("l1", "trimmed"))
  kpd = {r.label: dict(r.overrides) for r in runs if r.method == "kpd"}
  assert set(kpd) == {"kpd r4", "kpd r4, trimmed L1"}
  assert kpd["kpd r4, trimmed L1"]["sparsity.penalty"] == "trimmed"
  assert "sparsity.penalty" not in kpd["kpd r4"]  # the default: the same run as before
  names = {r.label: r.name for r in runs if r.method == "kpd"}
  assert names["kpd r4, trimmed L1"] == "mlp/kpd_r4_trimmed_l1_d0.1_s0"  # capitals kept


def test_invocation_records_every_flag_of_the_study(study_flags):
  study_flags(["study", "--models=cnn", "--penalties=l1,trimmed", "--freeze_fractions=1/2",
               "--nosweep", "--override=batch_size=8"])
  command = study.invocation()
  assert command == ("python -m benchmarks.study --models=cnn --penalties=l1,trimmed "
                     "--freeze_fractions=1/2 --nosweep --override=batch_size=8")


def test_report_shows_commands_without_report_paths(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  recorded = (f"python -m benchmarks.study --out={tmp_path}/runs/s --models=cnn "
              "--results=/elsewhere/r.md --plots_dir=/elsewhere/p")
  assert study.shown(recorded) == "python -m benchmarks.study --out=runs/s --models=cnn"
  assert study.shown("python -m benchmarks.study --out=/data/s") == (
      "python -m benchmarks.study --out=/data/s")


def _fake_study(out, lr, runs, epochs=6.0):
  """A study directory with ``runs`` [(label, seed, final val, test)] at learning rate lr."""
  entries = {}
  for label, seed, val, test in runs:
    name = f"mlp/{label}_e{epochs:g}_s{seed}"
    os.makedirs(out / name)
    (out / name / "config.json").write_text(json.dumps({"optimizer": {"learning_rate": lr}}))
    (out / name / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "val/accuracy": 0.1}) + "\n"
        + json.dumps({"step": 2, "val/accuracy": val}) + "\n")
    dense = label in ("dense", "gradual")
    entries[name] = {"run": name, "model": "mlp", "label": label, "target": 1.0 if label ==
                     "dense" else 0.1, "method": label.split()[0], "seed": seed,
                     "accuracy": test, "density": 0.1, "flops": 10.0 if dense else 1.0,
                     "step_ms": 2.0, "wall_s": 100.0 if dense else 90.0,
                     "state_mb": 1.0, "step_mb": 2.0,
                     "rss_mb": 600.0 if dense else 500.0,
                     "epochs": epochs}
  (out / "study.json").write_text(json.dumps(
      {"runs": entries, "invocations": {"mlp": [f"python -m benchmarks.study lr={lr}"]}}))
  return str(out)


def test_lr_choice_picks_by_validation_not_test(tmp_path):
  low = _fake_study(tmp_path / "a", 1e-3, [("gradual", 0, 0.80, 0.90), ("gradual", 1, 0.82, 0.90),
                                           ("static", 0, 0.7, 0.7)])
  high = _fake_study(tmp_path / "b", 5e-3, [("gradual", 0, 0.85, 0.80), ("gradual", 1, 0.85, 0.80),
                                            ("gradual", 2, 0.99, 0.99)])
  rows = [r for r in lr_choice.table(lr_choice.collect([low, high])).splitlines()[2:]]
  assert len(rows) == 2  # static: only in the first study, the configs' rate
  chosen = [r for r in rows if "**yes**" in r]
  assert len(chosen) == 1 and "| 0.005 | 2 |" in chosen[0]  # seed 2 left out: seeds 0, 1 only
  assert "85.00 ± 0.00" in chosen[0] and "80.00 ± 0.00" in chosen[0]


def test_results_report_each_method_at_its_chosen_rate(tmp_path):
  low = _fake_study(tmp_path / "a", 1e-3, [
      ("dense", 0, 0.90, 0.90), ("kpd r4", 0, 0.80, 0.80), ("gradual", 0, 0.85, 0.85)])
  high = _fake_study(tmp_path / "b", 1e-2, [
      ("dense", 0, 0.89, 0.99), ("kpd r4", 0, 0.88, 0.895), ("gradual", 0, 0.86, 0.86)])
  chosen = {r["label"]: r["lr"] for r in lr_choice.chosen_runs(lr_choice.collect([low, high]))}
  assert chosen == {"dense": 1e-3, "kpd r4": 1e-2, "gradual": 1e-2}
  text = "\n".join(study.tuned_section([low, high], lr_choice.collect([low, high]),
                                         str(tmp_path / "plots"), "plots"))
  assert "`python -m benchmarks.study lr=0.01`" in text  # the other rate's command
  assert "| kpd r4 | 0.1 | 1 | 89.50 |" in text and "| dense | 1 | 1 | 90.00 |" in text
  assert ("| kpd r4 at density 0.1: within 1.0 point of dense | 89.50% vs 90.00% (gap 0.50) "
          "| met |") in text
  assert ("| kpd r4 at density 0.1: at least as accurate as gradual | 89.50% vs 86.00% "
          "(+3.50) | met |") in text
  assert "| kpd r4 at density 0.1: training FLOPs ≤ 0.3x gradual | 0.10x | met |" in text
  # The fake runs all take 2 ms a step: not below gradual.
  assert "0.1: step time below gradual | 2.00 ms vs 2.00 ms | **missed** |" in text
  assert "0.1: wall time below gradual | 90 s vs 100 s | met |" in text
  assert "| kpd r4 | 0.1 | 1 | 89.50 | 0.100 | 0.000 | 0.10 | 2.00 | 90 |" in text
  assert "0.1: peak RSS below gradual | 500 MB vs 600 MB | met |" in text
  assert os.path.exists(tmp_path / "plots" / "mlp_6ep_accuracy_tuned_lr.png")


def test_lr_choice_keeps_budgets_apart_and_marks_a_single_rate(tmp_path):
  short = _fake_study(tmp_path / "a", 1e-3, [("dense", 0, 0.95, 0.95), ("gradual", 0, 0.9, 0.9)],
                      epochs=2.0)
  long_hi = _fake_study(tmp_path / "b", 1e-2, [("dense", 0, 0.90, 0.90), ("gradual", 0, 0.8, 0.8)])
  long_lo = _fake_study(tmp_path / "c", 5e-3, [("dense", 0, 0.92, 0.93)])
  groups = lr_choice.collect([short, long_hi, long_lo])
  assert set(groups) == {("mlp", 6.0, "dense", 1.0), ("mlp", 6.0, "gradual", 0.1)}
  chosen = {r["label"]: (r["lr"], r["accuracy"]) for r in lr_choice.chosen_runs(groups)}
  assert chosen == {"dense": (5e-3, 0.93), "gradual": (1e-2, 0.8)}  # not the 2-epoch runs
  rows = lr_choice.table(groups).splitlines()[2:]
  assert [r for r in rows if "gradual" in r] == [
      "| mlp | 6 | gradual | 0.1 | 0.01 | 1 | 80.00 ± 0.00 | 80.00 ± 0.00 | the only rate run |"]
  text = "\n".join(study.tuned_section(
      [short, long_hi, long_lo], groups, str(tmp_path / "p"), "p"))
  assert "### mlp, 6 epochs, at the chosen rates" in text and "2 epochs" not in text
  assert "| dense | 1 | 1 | 93.00 |" in text and "| gradual | 0.1 | 1 | 80.00 |" in text


def test_glance_checks_the_kpd_row_chosen_on_validation(tmp_path):
  low = _fake_study(tmp_path / "a", 1e-3, [("dense", 0, 0.90, 0.90), ("gradual", 0, 0.85, 0.85),
                                           ("kpd r4", 0, 0.80, 0.80),
                                           ("kpd r4, lam 0", 0, 0.70, 0.70)])
  high = _fake_study(tmp_path / "b", 1e-2, [("dense", 0, 0.89, 0.89), ("gradual", 0, 0.86, 0.86),
                                            ("kpd r4", 0, 0.88, 0.80),
                                            ("kpd r4, lam 0", 0, 0.87, 0.95)])
  tuned = lr_choice.chosen_runs(lr_choice.collect([low, high]))
  assert study.best_kpd_label(tuned, "mlp") == "kpd r4"  # best validation, not best test
  text = "\n".join(study.glance([], tuned))
  assert "| mlp | 6 epochs, tuned rates | kpd r4 at density 0.1: within 1.0 point of dense" in text
  assert "lam 0" not in text


def test_report_of_rate_studies_alone_keeps_methods_run_at_one_rate(tmp_path, study_flags):
  # Each method rerun at the rate chosen before: gradual and dense at 5e-3, KPD at 1e-2
  # (dense at both). No study at the configs' rate: --out has no study.json.
  low = _fake_study(tmp_path / "a", 5e-3, [("dense", 0, 0.90, 0.90), ("gradual", 0, 0.86, 0.86)])
  high = _fake_study(tmp_path / "b", 1e-2, [("dense", 0, 0.89, 0.99), ("kpd r4", 0, 0.88, 0.87)])
  assert set(lr_choice.collect([low, high])) == {("mlp", 6.0, "dense", 1.0),
                                                 ("mlp", 6.0, "kpd r4", 0.1)}
  flags.FLAGS(["study", f"--out={tmp_path / 'none'}", "--report_only",
               f"--lr_studies={low},{high}", f"--results={tmp_path / 'R.md'}",
               f"--plots_dir={tmp_path / 'p'}"])
  study.main([])
  text = (tmp_path / "R.md").read_text()
  assert "The configs' rate is the study above" not in text
  assert "`python -m benchmarks.study lr=0.005`" in text  # both studies' commands
  assert "| mlp | 6 | gradual | 0.1 | 0.005 | 1 | 86.00 ± 0.00 | 86.00 ± 0.00 | the only rate run |" in text
  assert ("| kpd r4 at density 0.1: at least as accurate as gradual | 87.00% vs 86.00% "
          "(+1.00) | met |") in text
  assert "| kpd r4 at density 0.1: within 1.0 point of dense | 87.00% vs 90.00% (gap 3.00)" in text


def test_report_only_without_a_study_names_the_missing_file(tmp_path, study_flags):
  flags.FLAGS(["study", f"--out={tmp_path / 'typo'}", "--report_only",
               f"--results={tmp_path / 'R.md'}"])
  with pytest.raises(SystemExit, match="typo/study.json does not exist"):
    study.main([])
