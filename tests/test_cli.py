"""Command line and configuration: spellings, precedence, validation and exit codes (no image processing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinicadl_app import __version__
from clinicadl_app.cli import build_parser, ignored_options, main, option_name, parse_args, unread_by_stages
from clinicadl_app.core.config import Config
from clinicadl_app.core.config_file import read_config_file
from clinicadl_app.core.errors import ExitCode, UsageError

from .conftest import DEMO, ROOT, run_app


def test_version_is_the_version_file(capsys):
    assert main(["-v"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"clinicadl-app {__version__}"
    assert __version__ == (ROOT / "version").read_text().strip()


def test_snake_and_kebab_spellings_are_the_same_option(tmp_path):
    snake = parse_args([str(DEMO), str(tmp_path), "participant", "--n_cpus", "3", "--participant_label", "01"])
    kebab = parse_args([str(DEMO), str(tmp_path), "participant", "--n-cpus", "3", "--participant-label", "01"])
    alias = parse_args([str(DEMO), str(tmp_path), "participant", "--nprocs", "3", "--participant-label", "01"])
    assert snake == kebab == alias
    assert snake.execution.n_cpus == 3


def test_config_file_is_overridden_by_command_line(tmp_path):
    config = tmp_path / "experiment.toml"
    config.write_text('[extraction]\nmodes = ["patch", "slice"]\npatch_size = 32\n[execution]\nn_cpus = 2\n')
    parsed = parse_args([str(DEMO), str(tmp_path / "out"), "participant", "--config", str(config), "--patch_size", "40"])
    assert parsed.extraction.modes == ("patch", "slice")
    assert parsed.extraction.patch_size == 40  # command line wins
    assert parsed.execution.n_cpus == 2  # file beats default


def test_saved_config_round_trips(tmp_path):
    first = parse_args([str(DEMO), str(tmp_path / "out"), "participant", "--modes", "roi", "--roi_list", "leftHippocampus",
                        "--discarded_slices", "10", "30", "--work_dir", str(tmp_path / "w")])
    record = tmp_path / "record.toml"
    record.write_text(first.to_toml())
    again = parse_args([str(DEMO), str(tmp_path / "out"), "participant", "--config", str(record)])
    assert again == first


def test_a_search_space_round_trips_through_the_saved_config(tmp_path):
    config = tmp_path / "search.toml"
    config.write_text('[train]\nepochs = 2\n[search]\nsampler = "tpe"\nn_trials = 3\n'
                      'learning_rate = {exponent = [3, 5]}\narchitecture = {choice = ["Conv5_FC3", "random"]}\n')
    first = parse_args([str(DEMO), str(tmp_path / "out"), "group", "--config", str(config), "--search_seed", "4"])
    assert first.search.space == {"learning_rate": {"exponent": [3, 5]},
                                  "architecture": {"choice": ["Conv5_FC3", "random"]}}
    assert (first.search.sampler, first.search.n_trials, first.search.seed) == ("tpe", 3, 4)
    record = tmp_path / "record.toml"
    record.write_text(first.to_toml())
    assert parse_args([str(DEMO), str(tmp_path / "out"), "group", "--config", str(record)]) == first


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["participant", "--patch_size", "0"], ExitCode.USAGE, "patch_size"),
        (["participant", "--modes", "voxel"], ExitCode.USAGE, "invalid choice"),
        (["participant", "--no-such-option"], ExitCode.USAGE, "unrecognized"),
        (["subject"], ExitCode.UNKNOWN_LEVEL, "unknown analysis level"),
        (["participant", "--verbose", "--quiet"], ExitCode.USAGE, "--quiet"),
        (["participant", "--discarded_slices", "1", "2", "3"], ExitCode.USAGE, "discarded_slices"),
        # a class value with a slash ("MCI/AD" in participants.tsv) made a nested splits folder and MAPS name
        (["group", "--column", "dx", "--values", "MCI/AD", "CN"], ExitCode.USAGE, "'dx_MCI/AD_CN', which is not one"),
        (["group", "--column", "dx/bl"], ExitCode.USAGE, "give the splits a --name"),
    ],
)
def test_usage_errors_are_one_line_with_their_exit_code(tmp_path, capsys, argv, code, fragment):
    assert main([str(DEMO), str(tmp_path / "out"), *argv]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_missing_bids_folder_is_exit_66(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == ExitCode.MISSING_INPUT
    assert "nope" in capsys.readouterr().err


def test_output_inside_bids_outside_derivatives_is_refused(tmp_path):
    with pytest.raises(UsageError, match="derivatives"):
        parse_args([str(DEMO), str(DEMO / "out"), "participant"])


def test_bad_config_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[extraction]\npatch_sise = 3\n")
    with pytest.raises(UsageError, match="patch_sise"):
        read_config_file(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[extraction\n")
    with pytest.raises(UsageError, match="broken.toml"):
        read_config_file(broken)
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('[extraction]\npatch_size = "big"\n')
    with pytest.raises(UsageError, match="patch_size"):
        parse_args([str(DEMO), str(tmp_path / "o"), "participant", "--config", str(wrong_type)])


def test_relative_paths_in_config_are_relative_to_the_file(tmp_path):
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "c.toml"
    config.write_text('[execution]\nwork_dir = "scratch"\n')
    parsed = parse_args([str(DEMO), str(tmp_path / "o"), "participant", "--config", str(config)])
    assert parsed.execution.work_dir == tmp_path / "conf" / "scratch"


def test_every_config_field_has_an_option_and_help():
    parser = build_parser()
    options = {s for action in parser._actions for s in action.option_strings}
    toml_only = []
    for section, cls in Config.SECTIONS.items():
        for name, spec in cls.__dataclass_fields__.items():
            flag = option_name(section, name)
            if spec.metadata.get("toml_only"):
                toml_only.append(f"{section}.{name}")
                assert flag not in options
                continue
            assert flag in options and flag.replace("_", "-").replace("--", "--", 1) in options
    assert toml_only == ["search.space"]  # a table of samplers has no command-line form


def test_group_level_without_a_label_says_what_to_set(tmp_path):
    done = run_app(DEMO, tmp_path / "out", "group")
    assert done.returncode == ExitCode.USAGE
    assert "[labels] column is required" in done.stderr and "Traceback" not in done.stderr


def test_options_the_level_does_not_read_are_named_not_ignored_in_silence(tmp_path):
    """Training options at the participant level, preprocessing or BIDS-query options at the group level: one
    warning names them (a shared TOML file may hold both levels' settings; only the command line counts)."""
    config = tmp_path / "experiment.toml"
    config.write_text('[labels]\ncolumn = "sex"\n[preprocessing]\nqc_threshold = 0.4\n')
    participant = [str(DEMO), str(tmp_path / "out"), "participant", "--config", str(config), "--epochs", "3",
                   "--name", "x", "--stages", "train", "--n_cpus", "1", "--skip_bids_validator"]
    assert sorted(ignored_options(participant)) == ["--epochs", "--name", "--stages"]
    group = [str(DEMO), str(tmp_path / "out"), "group", "--config", str(config), "--qc_threshold", "0.5",
             "--bids_filter_file", "f.json", "--skip-bids-validator", "--patch_size", "40", "--participant_label", "01"]
    assert sorted(ignored_options(group)) == ["--bids_filter_file", "--qc_threshold", "--skip_bids_validator"]
    done = run_app(DEMO, tmp_path / "out", "participant", "--participant_label", "nobody", "--epochs", "3",
                   "--skip_bids_validator")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--epochs: not read at the participant level, ignored" in done.stderr and "sub-nobody" in done.stderr


def test_options_the_stages_run_do_not_read_are_named(tmp_path):
    """--stages predict takes the trained MAPS's settings: --epochs or --n_test there would change nothing, and a
    researcher must hear so rather than believe them applied."""
    group = [str(DEMO), str(tmp_path / "out"), "group", "--column", "sex", "--epochs", "3", "--n_test", "0.3",
             "--maps_dir", "m", "--group_name", "g", "--mode", "patch", "--methods", "gradients", "--near_duplicate",
             "0.9", "--card_fingerprints", "--participant_label", "01", "--no-gpu"]  # --gpu: where the job runs
    assert sorted(unread_by_stages(group, ("predict",))) == ["--card_fingerprints", "--epochs", "--methods",
                                                            "--n_test"]
    labels = [str(DEMO), str(tmp_path / "out"), "group", "--column", "sex", "--age_column", "age_at_scan",
              "--keep_failed_qc", "--subgroups", "MCI=sMCI,pMCI"]  # --column names the MAPS: every stage reads it
    assert sorted(unread_by_stages(labels, ("train",))) == ["--age_column", "--keep_failed_qc"]
    assert sorted(unread_by_stages(labels, ("predict",))) == ["--age_column", "--keep_failed_qc", "--subgroups"]
    assert unread_by_stages(labels, ("labels",)) == []
    assert sorted(unread_by_stages(group, ("interpret", "report"))) == ["--epochs", "--n_test", "--near_duplicate"]
    assert sorted(unread_by_stages(group, ("labels", "split"))) == [
        "--card_fingerprints", "--epochs", "--gpu", "--group_name", "--maps_dir", "--methods", "--mode",
        "--near_duplicate"]
    assert unread_by_stages(group, ("labels", "split", "train", "predict", "interpret", "report", "export")) == []
    done = run_app(DEMO, tmp_path / "out", "group", "--column", "sex", "--stages", "predict", "--epochs", "3")
    assert done.returncode != 0  # nothing was trained
    assert "--epochs: not read by the stages run (predict), ignored; predict, interpret and report use the settings " \
           "the MAPS recorded" in done.stderr, done.stderr


def test_help_lists_every_section():
    help_text = build_parser().format_help()
    for section in Config.SECTIONS:
        assert f"[{section}]" in help_text
    groups = {group.title: group.description for group in build_parser()._action_groups}
    for section in Config.SECTIONS:  # a wrapped docstring is said whole, not cut at its first line
        assert groups[f"[{section}]"].endswith((".", ")")), groups[f"[{section}]"]
    helps = [action.help or "" for action in build_parser()._actions]
    assert "(default: )" not in help_text and all(text.count("(default:") <= 1 for text in helps)
    assert any(text.endswith("(default: the [labels] folder's)") for text in helps)
    assert Path(ROOT / "run.py").exists()
