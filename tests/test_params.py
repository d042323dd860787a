"""Tests for combireg.params (parameter files) and the ``combireg params`` commands."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from combireg.errors import CombiregError
from combireg.paramfile import ParsedParamMap, parse_text, read_parameter_file
from combireg.params import (
    METRICS,
    Settings,
    default_parameter_map,
    default_parameter_text,
    default_settings,
    format_parameter_map,
    load_settings,
    settings_from_map,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "params"


@pytest.fixture(scope="module")
def cli() -> click.Group:
    from combireg.cli.main import main

    return main


def _invoke(cli: click.Group, *args: str):
    return CliRunner().invoke(cli, list(args))


# --------------------------------------------------------------------------------------------
# Syntax
# --------------------------------------------------------------------------------------------


def test_parse_comments_quotes_and_multiple_values():
    text = (
        "// whole-line comment\n"
        "\n"
        '   (Metric "MSE" "NCC")   // trailing comment\n'
        "\t(MaximumNumberOfIterations 200\t100)\n"
        '(Unknown "a // not a comment" b)\n'
        "(Empty)\n"
        "  // indented comment (Seed 3)\n"
    )
    pm = parse_text(text)
    assert pm == {
        "Metric": ("MSE", "NCC"),
        "MaximumNumberOfIterations": ("200", "100"),
        "Unknown": ("a // not a comment", "b"),
        "Empty": (),
    }
    assert list(pm) == ["Metric", "MaximumNumberOfIterations", "Unknown", "Empty"]
    assert pm.lines == {"Metric": 3, "MaximumNumberOfIterations": 4, "Unknown": 5, "Empty": 6}
    assert pm.source == "<string>"


def test_parse_crlf_bom_and_empty_quoted_value():
    pm = parse_text('\ufeff(A "")\r\n(B 1)//x\r\n', source="f.txt")
    assert pm == {"A": ("",), "B": ("1",)}
    assert pm.lines == {"A": 1, "B": 2}
    assert pm.source == "f.txt"


def test_parse_empty_text():
    assert parse_text("") == {}
    assert parse_text("// only comments\n\n") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\nMetric 1", "f.txt:2: expected '(' at the start of an entry, got 'Metric 1'"),
        ("(Seed 1", "f.txt:1: missing ')'"),
        ("(Seed 1 // comment)", "f.txt:1: missing ')'"),
        ('(Metric "MSE)', "f.txt:1: unbalanced quote"),
        ('(Metric "MSE"x)', "f.txt:1: expected a space or ')' after the closing quote, got 'x'"),
        ("()", "f.txt:1: empty key"),
        ('("" 1)', "f.txt:1: empty key"),
        ("(Seed 1) junk", "f.txt:1: unexpected text after ')': 'junk'"),
        ("(Seed 1)(Seed 2)", "f.txt:1: unexpected text after ')': '(Seed 2)'"),
        ("(Seed (1))", "f.txt:1: unexpected '(' inside an entry"),
        ('("Seed" 1)', "f.txt:1: the key must not be quoted: 'Seed'"),
        ("(1Seed 1)", "f.txt:1: invalid key '1Seed' (letters, digits and '_', not starting with a digit)"),
        ("(Seed 1)\n// x\n(Seed 2)", "f.txt:3: duplicate key 'Seed' (first given on line 1)"),
    ],
)
def test_syntax_errors(text, message):
    with pytest.raises(CombiregError) as info:
        parse_text(text, source="f.txt")
    assert str(info.value) == message


def test_syntax_error_default_source_is_string():
    with pytest.raises(CombiregError, match=r"^<string>:1: missing '\)'$"):
        parse_text("(Seed 1")


# --------------------------------------------------------------------------------------------
# Per-level fallback and defaults
# --------------------------------------------------------------------------------------------


def _settings(text: str) -> Settings:
    return settings_from_map(parse_text(text, source="p.txt"))


def test_fallback_single_value_applies_to_every_level():
    s = _settings("(NumberOfResolutions 3)\n(MaximumNumberOfIterations 40)\n(LearningRate 0.5)")
    assert s.iterations == (40, 40, 40)
    assert s.learning_rate == (0.5, 0.5, 0.5)


def test_fallback_partial_list_takes_first_value():
    s = _settings("(NumberOfResolutions 3)\n(MaximumNumberOfIterations 200 100)\n(NCCWindowSize 9 5)")
    assert s.iterations == (200, 100, 200)
    assert s.ncc_window == (9, 5, 9)


def test_fallback_full_list_is_kept():
    s = _settings("(NumberOfResolutions 3)\n(RegularizationWeight 3 2 0.5)")
    assert s.regularization_weight == (3.0, 2.0, 0.5)


def test_defaults_follow_number_of_levels():
    one = _settings("(NumberOfResolutions 1)")
    assert one.iterations == (150,)
    assert one.pyramid_spacing == (2.0,) and one.pyramid_schedule == ()
    four = _settings("(NumberOfResolutions 4)")
    assert four.iterations == (150, 80, 30, 150)
    assert four.pyramid_spacing == (16.0, 8.0, 4.0, 2.0)
    assert four.ncc_window_mm == (30.0, 14.0, 9.0, 30.0) and four.ncc_window == ()
    voxels = _settings("(NumberOfResolutions 4)\n(ImagePyramidSchedule 16 16 16 8 8 8 4 4 4 2 2 2)\n"
                       "(NCCWindowSize 5 5 7)")
    assert voxels.pyramid_schedule == ((16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)) and voxels.pyramid_spacing == ()
    assert voxels.ncc_window == (5, 5, 7, 5) and voxels.ncc_window_mm == ()


def test_default_settings_values():
    s = default_settings()
    assert s.metrics == ("MSE", "NCC")
    assert s.metric_weights == (0.5, 0.5)
    assert s.ncc_window_mm == (30.0, 14.0, 9.0) and s.ncc_window == ()
    assert s.regularization_weight == (0.3, 0.1, 0.05) and s.bending_weight == (2.0, 2.0, 2.0)
    assert s.num_levels == 3
    assert s.pyramid_spacing == (8.0, 4.0, 2.0) and s.pyramid_schedule == ()
    assert s.iterations == (150, 80, 30)
    assert s.learning_rate == (0.02, 0.01, 0.005)
    assert s.optimizer == "Adam"
    assert s.bidirectional is False
    assert s.inverse_consistency_weight == 0.0
    assert s.seed == 0
    assert s.normalization_percentiles == (0.5, 99.5)
    assert s.num_threads == 0
    assert s.source == "<defaults>"


def test_anisotropic_schedule_and_equal_weights():
    s = _settings(
        '(Metric "MSE" "NCC" "GlobalNCC")\n(NumberOfResolutions 2)\n'
        "(ImagePyramidSchedule 4 4 2 2 2 1)\n(Bidirectional \"false\")"
    )
    assert s.pyramid_schedule == ((4, 4, 2), (2, 2, 1))
    assert s.metric_weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s.bidirectional is False
    assert "GlobalNCC" in METRICS


def test_given_weights_are_used():
    s = _settings('(Metric "NCC" "MSE")\n(Metric0Weight 0.25)\n(Metric1Weight 0.75)')
    assert s.metrics == ("NCC", "MSE")
    assert s.metric_weights == (0.25, 0.75)


def test_weights_sum_within_tolerance():
    s = _settings('(Metric "MSE" "NCC")\n(Metric0Weight 0.3333333)\n(Metric1Weight 0.6666667)')
    assert s.metric_weights == (0.3333333, 0.6666667)


# --------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(Seed 1)\n(LearningRat 0.1)", "p.txt:2: unknown key 'LearningRat' (did you mean 'LearningRate'?)"),
        ("(metric \"MSE\")", "p.txt:1: unknown key 'metric' (did you mean 'Metric'?)"),
        # Transform became a key (issue 15): an elastix transform name is now a wrong value, not a wrong key.
        ("(Transform \"BSplineTransform\")",
         "p.txt:1: Transform expects one of 'Displacement', 'Diffeomorphic', got 'BSplineTransform'"),
        ("(Seed abc)", "p.txt:1: Seed expects an integer >= 0 and <= 4294967295, got 'abc'"),
        ("(Seed -1)", "p.txt:1: Seed expects an integer >= 0 and <= 4294967295, got '-1'"),
        ("(NumberOfResolutions 2.0)", "p.txt:1: NumberOfResolutions expects an integer >= 1, got '2.0'"),
        ("(NumberOfResolutions 0)", "p.txt:1: NumberOfResolutions expects an integer >= 1, got '0'"),
        ("(MaximumNumberOfIterations 10 x)",
         "p.txt:1: MaximumNumberOfIterations expects an integer >= 0, got 'x' (value 2)"),
        ("(NCCWindowSize 4)", "p.txt:1: NCCWindowSize expects an odd integer >= 3, got '4'"),
        ("(NCCWindowSize 1)", "p.txt:1: NCCWindowSize expects an odd integer >= 3, got '1'"),
        ("(LearningRate 0)", "p.txt:1: LearningRate expects a number > 0, got '0'"),
        ("(LearningRate nan)", "p.txt:1: LearningRate expects a number > 0, got 'nan'"),
        ("(RegularizationWeight -0.5)", "p.txt:1: RegularizationWeight expects a number >= 0, got '-0.5'"),
        ("(InverseConsistencyWeight 1e999)",
         "p.txt:1: InverseConsistencyWeight expects a number >= 0, got '1e999'"),
        ("(Bidirectional yes)", "p.txt:1: Bidirectional expects \"true\" or \"false\", got 'yes'"),
        ("(Optimizer \"SGD\")", "p.txt:1: Optimizer expects one of 'Adam', got 'SGD'"),
        ('(Metric "Mattes")', "p.txt:1: Metric expects one of 'MSE', 'NCC', 'GlobalNCC', 'MI', 'NGF', got 'Mattes'"),
        ('(Metric "MSE" "MSE")', "p.txt:1: Metric lists 'MSE' more than once"),
        ("(Metric)", "p.txt:1: Metric expects 1 to 4 values, got 0"),
        ('(Metric "MSE" "NCC" "GlobalNCC" "MSE" "NCC")', "p.txt:1: Metric expects 1 to 4 values, got 5"),
        ("(Seed 1 2)", "p.txt:1: Seed expects exactly 1 value, got 2"),
        ("(NormalizationPercentiles 5)", "p.txt:1: NormalizationPercentiles expects exactly 2 values, got 1"),
        ("(NormalizationPercentiles 5 101)",
         "p.txt:1: NormalizationPercentiles expects a number >= 0 and <= 100, got '101' (value 2)"),
        ("(NormalizationPercentiles 60 40)",
         "p.txt:1: NormalizationPercentiles expects lo < hi, got '60' '40'"),
        ("(Metric0Weight -0.1)", "p.txt:1: Metric0Weight expects a number >= 0, got '-0.1'"),
        ("(Metric01Weight 1)", "p.txt:1: unknown key 'Metric01Weight' (did you mean 'Metric1Weight'?)"),
        ('(Transform "SVF")', "p.txt:1: Transform expects one of 'Displacement', 'Diffeomorphic', got 'SVF'"),
        ('(Seed 1)\n(Transform "Displacement" "Diffeomorphic")', "p.txt:2: Transform expects exactly 1 value, got 2"),
        ("(NumberOfSquaringSteps 21)", "p.txt:1: NumberOfSquaringSteps expects an integer >= 0 and <= 20, got '21'"),
        ("(NumberOfSquaringSteps -1)", "p.txt:1: NumberOfSquaringSteps expects an integer >= 0 and <= 20, got '-1'"),
        ("(NumberOfSquaringSteps 7.5)",
         "p.txt:1: NumberOfSquaringSteps expects an integer >= 0 and <= 20, got '7.5'"),
        ('(Transfrom "Diffeomorphic")', "p.txt:1: unknown key 'Transfrom' (did you mean 'Transform'?)"),
    ],
)
def test_value_errors(text, message):
    with pytest.raises(CombiregError) as info:
        _settings(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('(Metric "MSE" "NCC")\n\n(Metric2Weight 0.3)',
         "p.txt:3: Metric2Weight has no metric: Metric lists 2 (line 1), "
         "so the weight keys are Metric0Weight to Metric1Weight"),
        ("(Metric0Weight 0.3)",
         "p.txt:1: metric weights must sum to 1, got 0.8 "
         "(Metric0Weight 0.3, Metric1Weight 0.5 (default))"),
        ('(Metric "MSE" "NCC")\n(Metric1Weight 0.6)\n(Metric0Weight 0.6)',
         "p.txt:3: metric weights must sum to 1, got 1.2 (Metric0Weight 0.6, Metric1Weight 0.6)"),
        ("(NumberOfResolutions 2)\n(MaximumNumberOfIterations 1 2 3)",
         "p.txt:2: MaximumNumberOfIterations expects 1 to 2 values (one per resolution; "
         "NumberOfResolutions is 2 (line 1)), got 3"),
        ("(LearningRate 0.1 0.1 0.1 0.1)",
         "p.txt:1: LearningRate expects 1 to 3 values (one per resolution; "
         "NumberOfResolutions is 3), got 4"),
        ("(NumberOfResolutions 1)\n(ImagePyramidSchedule 2 2 2 1 1 1)",
         "p.txt:2: ImagePyramidSchedule expects 3 values (x y z for each of 1 resolution; "
         "NumberOfResolutions is 1 (line 1)), got 6"),
        ("(ImagePyramidSchedule 4 4 4)",
         "p.txt:1: ImagePyramidSchedule expects 9 values (x y z for each of 3 resolutions; "
         "NumberOfResolutions is 3), got 3"),
        ("(ImagePyramidSchedule 4 4 4 2 2 2 1 4 1)",
         "p.txt:1: ImagePyramidSchedule: level 2 factors 1 4 1 are larger than level 1 factors "
         "2 2 2 (levels go coarse to fine; factors must not increase)"),
        ("(ImagePyramidSchedule 2 2 2 1 0 1)",
         "p.txt:1: ImagePyramidSchedule expects an integer >= 1, got '0' (value 5)"),
    ],
)
def test_cross_key_errors_name_the_offending_line(text, message):
    with pytest.raises(CombiregError) as info:
        _settings(text)
    assert str(info.value) == message


def test_first_error_in_file_order_is_reported():
    text = "(Seed 1)\n(NCCWindowSize 4)\n(LearningRate 0)"
    with pytest.raises(CombiregError, match=r"^p\.txt:2: NCCWindowSize "):
        _settings(text)


def test_plain_dict_errors_have_no_line_numbers():
    with pytest.raises(CombiregError) as info:
        settings_from_map({"LearningRat": ("1",)})
    assert str(info.value) == "<string>: unknown key 'LearningRat' (did you mean 'LearningRate'?)"
    with pytest.raises(CombiregError) as info:
        settings_from_map({"Seed": ("x",)}, source="cfg")
    assert str(info.value) == "cfg: Seed expects an integer >= 0 and <= 4294967295, got 'x'"


def test_source_comes_from_parsed_map():
    pm = ParsedParamMap({"Seed": ("5",)}, source="a.txt", lines={"Seed": 7})
    s = settings_from_map(pm)
    assert s.seed == 5 and s.source == "a.txt"
    with pytest.raises(CombiregError, match=r"^a\.txt:7: Seed expects"):
        settings_from_map(ParsedParamMap({"Seed": ("-5",)}, source="a.txt", lines={"Seed": 7}))


def test_read_parameter_file_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CombiregError) as info:
        read_parameter_file(missing)
    assert str(info.value) == f"{missing}: no such file"
    with pytest.raises(CombiregError, match=r": cannot read parameter file"):
        read_parameter_file(tmp_path)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"(Seed \xff)")
    with pytest.raises(CombiregError, match=r"bin\.txt: not a UTF-8 text file"):
        read_parameter_file(binary)


def test_load_settings(tmp_path):
    assert load_settings() == default_settings()
    path = tmp_path / "p.txt"
    path.write_text("(Seed 42)\n(Bidirectional \"false\")\n")
    s = load_settings(path)
    assert s.seed == 42 and s.bidirectional is False and s.source == str(path)
    path.write_text("(Seed 42)\n(Sed 1)\n")
    with pytest.raises(CombiregError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:2: unknown key 'Sed' (did you mean 'Seed'?)"


# --------------------------------------------------------------------------------------------
# Writing and round trips
# --------------------------------------------------------------------------------------------


def test_format_quotes_string_keys_only():
    pm = {
        "Metric": ("MSE", "NCC"),
        "Bidirectional": ("false",),
        "MaximumNumberOfIterations": ("10", "5"),
        "Other": ("3.5", "word", "two words", ""),
    }
    assert format_parameter_map(pm) == (
        '(Metric "MSE" "NCC")\n'
        '(Bidirectional "false")\n'
        "(MaximumNumberOfIterations 10 5)\n"
        '(Other 3.5 "word" "two words" "")\n'
    )


def test_format_with_comments_describes_keys():
    text = format_parameter_map({"LearningRate": ("0.1",), "Unknown": ("1",)}, comments=True)
    lines = text.splitlines()
    assert lines[0].startswith("// Adam step size per resolution")
    assert "normalised grid units" in lines[0] and "grid_sample" in lines[0]
    assert lines[1:] == ["(LearningRate 0.1)", "(Unknown 1)"]


def test_format_rejects_unwritable_values():
    with pytest.raises(CombiregError, match="contains a quote"):
        format_parameter_map({"Other": ('a"b',)})
    with pytest.raises(CombiregError, match="cannot write key"):
        format_parameter_map({"bad key": ("1",)})


def test_text_map_text_map_round_trip():
    text = (
        "// comment\n"
        '(Metric "MSE" "NCC")  // why\n'
        "(Metric0Weight 0.25)\n(Metric1Weight 0.75)\n"
        '(Odd "a // b" "(x)" "" 1e-3 -2 bare)\n'
        "(NoValues)\n"
    )
    pm = parse_text(text)
    again = parse_text(format_parameter_map(pm))
    assert again == pm
    assert format_parameter_map(again) == format_parameter_map(pm)
    assert again["Odd"] == ("a // b", "(x)", "", "1e-3", "-2", "bare")


def test_format_parse_round_trip_of_plain_map():
    pm = {"Metric": ("GlobalNCC",), "Seed": ("7",), "X": ("has space", "semi;colon", "/slash/")}
    assert parse_text(format_parameter_map(pm)) == pm


def test_settings_map_settings_round_trip():
    s = _settings(
        '(Metric "NCC" "GlobalNCC" "MSE")\n(Metric0Weight 0.2)\n(Metric1Weight 0.3)\n'
        "(Metric2Weight 0.5)\n(NumberOfResolutions 3)\n(ImagePyramidSchedule 4 4 2 2 2 1 1 1 1)\n"
        "(LearningRate 0.1 0.003)\n(RegularizationWeight 0.1)\n(Seed 123)\n"
        "(NormalizationPercentiles 1 99)\n(NumberOfThreads 4)\n(InverseConsistencyWeight 0.30000000000000004)"
    )
    pm = s.to_parameter_map()
    assert pm["LearningRate"] == ("0.1", "0.003", "0.1")
    assert pm["RegularizationWeight"] == ("0.1", "0.1", "0.1")
    assert pm["ImagePyramidSchedule"] == ("4", "4", "2", "2", "2", "1", "1", "1", "1")
    back = settings_from_map(pm)
    assert back == s
    assert back.inverse_consistency_weight == 0.30000000000000004
    # ... and through text as well.
    assert settings_from_map(parse_text(format_parameter_map(pm))) == s


def test_source_does_not_take_part_in_equality():
    a = default_settings()
    b = settings_from_map({}, source="elsewhere")
    assert a == b and a.source != b.source


def test_default_parameter_map_lists_every_key():
    pm = default_parameter_map()
    assert list(pm) == [
        "Metric", "Metric0Weight", "Metric1Weight", "NCCWindowWidth", "NumberOfHistogramBins", "RegularizationWeight",
        "BendingEnergyWeight", "NumberOfResolutions", "PyramidSpacing", "MaximumNumberOfIterations",
        "LearningRate", "WarmUpIterations", "Optimizer", "Bidirectional", "InverseConsistencyWeight", "MetricWeighting",
        "MetricWeightingInterval", "CorrespondenceWeighting", "CorrespondenceErrorScale", "CorrespondenceSmoothing",
        "CorrespondenceMaximumExclusion", "CorrespondenceUpdateInterval", "PreAlignment",
        "SequenceChangeDetection", "BiasFieldCorrection", "WorkingSpacing", "WorkingOrientation", "Seed",
        "NormalizationPercentiles", "NumberOfThreads",
    ]
    assert pm["PyramidSpacing"] == ("8.0", "4.0", "2.0")
    assert pm["Bidirectional"] == ("false",) and pm["WarmUpIterations"] == ("10",)
    assert pm["MetricWeighting"] == ("fixed",) and pm["CorrespondenceWeighting"] == ("false",)


def test_default_parameter_text_parses_to_defaults():
    text = default_parameter_text()
    assert text.startswith("// ")
    assert "(Metric \"MSE\" \"NCC\")" in text
    assert settings_from_map(parse_text(text)) == default_settings()
    assert parse_text(text) == default_parameter_map()


# --------------------------------------------------------------------------------------------
# Settings.replace
# --------------------------------------------------------------------------------------------


def test_replace_validates_and_applies_fallback():
    s = default_settings().replace(iterations=(5,), seed=9)
    assert s.iterations == (5, 5, 5) and s.seed == 9 and s.source == "<defaults>"
    with pytest.raises(CombiregError, match=r"^Settings\.replace: LearningRate expects a number > 0"):
        default_settings().replace(learning_rate=(-1.0,))


def test_replace_refits_levels_and_weights():
    s = default_settings().replace(num_levels=4)
    assert s.pyramid_spacing == (16.0, 8.0, 4.0, 2.0)
    assert s.iterations == (150, 80, 30, 150)
    one = default_settings().replace(num_levels=1, iterations=(30,))
    assert one.iterations == (30,) and one.ncc_window_mm == (30.0,) and one.pyramid_spacing == (2.0,)
    voxels = default_settings().replace(num_levels=1, pyramid_schedule=((2, 2, 2),), ncc_window=(5,))
    assert voxels.pyramid_schedule == ((2, 2, 2),) and voxels.pyramid_spacing == ()
    assert voxels.ncc_window == (5,) and voxels.ncc_window_mm == ()
    assert default_settings().replace(metrics=("NCC",)).metric_weights == (1.0,)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


#: The presets measured before the bending term keep the diffusion term they were measured with.
FORMER_REGULARISATION = {"regularization_weight": (0.3, 0.3, 0.1), "bending_weight": (0.0,)}


@pytest.mark.parametrize("name", ["default.txt", "paper_io.txt", "mse.txt", "ncc.txt", "mi.txt", "drn_io.txt",
                                  "drn_only.txt", "diffeomorphic.txt", "cross_sequence.txt"])
def test_presets_parse_and_start_with_a_header(name):
    path = PRESETS / name
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"// combireg preset: {name}")
    s = load_settings(path)
    assert s.source == str(path)
    assert settings_from_map(s.to_parameter_map()) == s


def test_diffeomorphic_preset_is_the_default_with_a_velocity_field():
    # with the regularisation it was measured with (the default's until the bending term came)
    assert load_settings(PRESETS / "diffeomorphic.txt") == default_settings().replace(
        transform="Diffeomorphic", **FORMER_REGULARISATION)


def test_cross_sequence_preset_adds_ngf_narrows_the_finest_window_and_runs_its_finest_level_longer():
    assert load_settings(PRESETS / "cross_sequence.txt") == default_settings().replace(
        metrics=("MSE", "NCC", "NGF"), metric_weights=(0.5, 0.25, 0.25), ncc_window_mm=(30.0, 14.0, 6.0),
        iterations=(150, 80, 180))


def test_default_preset_equals_defaults():
    assert load_settings(PRESETS / "default.txt") == default_settings()


def test_paper_io_preset():
    s = load_settings(PRESETS / "paper_io.txt")
    assert s.metrics == ("MSE", "NCC") and s.metric_weights == (0.5, 0.5)
    assert s.regularization_weight == (1.0,)
    assert s.learning_rate == (0.001,)
    assert s.iterations == (30,)
    assert s.num_levels == 1 and s.pyramid_schedule == ((1, 1, 1),)
    assert s.bidirectional is True and s.inverse_consistency_weight == 0.0


@pytest.mark.parametrize("name, metric", [("mse.txt", "MSE"), ("ncc.txt", "NCC")])
def test_single_metric_presets(name, metric):
    s = load_settings(PRESETS / name)
    assert s.metrics == (metric,) and s.metric_weights == (1.0,)
    # Everything else is the default.
    defaults = default_settings().replace(metrics=(metric,), **FORMER_REGULARISATION)
    assert s == defaults


def test_mi_preset():
    s = load_settings(PRESETS / "mi.txt")
    assert s.metrics == ("MI",) and s.metric_weights == (1.0,)
    assert s.histogram_bins == (32, 32, 32) and s.regularization_weight == (3.0, 3.0, 1.0)
    # Everything else is the default.
    assert s == default_settings().replace(metrics=("MI",), regularization_weight=(3.0, 3.0, 1.0),
                                           bending_weight=(0.0,))


def test_histogram_bins_per_level_and_errors():
    s = _settings('(Metric "MSE" "MI")\n(NumberOfResolutions 3)\n(NumberOfHistogramBins 16 24)')
    assert s.metrics == ("MSE", "MI") and s.histogram_bins == (16, 24, 16)
    assert default_settings().histogram_bins == (32, 32, 32)
    assert default_settings().replace(num_levels=1).histogram_bins == (32,)
    for text, message in [
        ("(NumberOfHistogramBins 3)", "p.txt:1: NumberOfHistogramBins expects an integer >= 4, got '3'"),
        ("(NumberOfHistogramBins 32.5)", "p.txt:1: NumberOfHistogramBins expects an integer >= 4, got '32.5'"),
        ("(NumberOfResolutions 2)\n(NumberOfHistogramBins 8 16 32)",
         "p.txt:2: NumberOfHistogramBins expects 1 to 2 values (one per resolution; NumberOfResolutions is 2 "
         "(line 1)), got 3"),
    ]:
        with pytest.raises(CombiregError) as info:
            settings_from_map(parse_text(text, "p.txt"))
        assert str(info.value) == message


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_defaults_prints_parsable_defaults(cli):
    result = _invoke(cli, "params", "defaults")
    assert result.exit_code == 0, result.output
    assert result.stdout == default_parameter_text()
    assert settings_from_map(parse_text(result.stdout)) == default_settings()


def test_cli_check_ok(cli, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('(Metric "MSE" "NCC")\n(Metric0Weight 0.25)\n(Metric1Weight 0.75)\n'
                    "(NumberOfResolutions 3)\n(MaximumNumberOfIterations 100 50 20)\n")
    result = _invoke(cli, "params", "check", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{path}: OK (5 keys; metrics MSE+NCC 0.25/0.75, 3 resolutions, iterations 100 50 20)\n"
    )


def test_cli_check_default_preset(cli):
    path = str(PRESETS / "default.txt")
    result = _invoke(cli, "params", "check", path)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{path}: OK (30 keys; metrics MSE+NCC 0.5/0.5, 3 resolutions, iterations 150 80 30)\n"
    )


def test_cli_check_invalid_file_exits_2(cli, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("(Seed 1)\n(LearningRat 0.1)\n")
    result = _invoke(cli, "params", "check", str(path))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"combireg: error: {path}:2: unknown key 'LearningRat' (did you mean 'LearningRate'?)\n"
    )


def test_cli_check_missing_file_exits_2(cli, tmp_path):
    path = tmp_path / "missing.txt"
    result = _invoke(cli, "params", "check", str(path))
    assert result.exit_code == 2
    assert result.stderr == f"combireg: error: {path}: no such file\n"


# --------------------------------------------------------------------------------------------
# Pyramid and NCC window in mm (PyramidSpacing, NCCWindowWidth) or voxels
# --------------------------------------------------------------------------------------------


def test_mm_pyramid_and_window_are_read():
    s = _settings("(NumberOfResolutions 2)\n(PyramidSpacing 6 3)\n(NCCWindowWidth 30 9)")
    assert s.pyramid_spacing == (6.0, 3.0) and s.pyramid_schedule == ()
    assert s.ncc_window_mm == (30.0, 9.0) and s.ncc_window == ()
    assert settings_from_map(parse_text(format_parameter_map(s.to_parameter_map()))) == s


@pytest.mark.parametrize("text, message", [
    ("(PyramidSpacing 8 4 2)\n(ImagePyramidSchedule 8 8 8 4 4 4 2 2 2)", r":1: give the pyramid either in mm"),
    ("(NCCWindowSize 5 5 7)\n(NCCWindowWidth 40 20 14)", r":2: give the NCC window either in mm"),
    ("(NumberOfResolutions 3)\n(PyramidSpacing 8 4)", r":2: PyramidSpacing expects 3 values"),
    ("(NumberOfResolutions 2)\n(PyramidSpacing 4 8)", r":2: PyramidSpacing: level 1 \(8 mm\) is coarser"),
    ("(PyramidSpacing 8 0 2)", r":1: PyramidSpacing expects a number > 0"),
    ("(NCCWindowWidth -3)", r":1: NCCWindowWidth expects a number > 0"),
])
def test_mm_pyramid_and_window_errors(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text + "\n")
    with pytest.raises(CombiregError, match=message):
        load_settings(path)


# --------------------------------------------------------------------------------------------
# The transform model (issue 15)
# --------------------------------------------------------------------------------------------


def test_transform_keys_are_read_and_round_trip():
    s = _settings('(Transform "Diffeomorphic")\n(NumberOfSquaringSteps 7)')
    assert s.transform == "Diffeomorphic" and s.diffeomorphic and s.squaring_steps == 7
    assert settings_from_map(s.to_parameter_map()) == s
    default = default_settings()
    assert default.transform == "Displacement" and not default.diffeomorphic and default.squaring_steps == 0
    # the default map (and so every Displacement params.txt) does not list them ...
    assert "Transform" not in default_parameter_map() and "NumberOfSquaringSteps" not in default_parameter_map()
    # ... and `combireg params defaults` shows them commented out
    text = default_parameter_text()
    assert '// (Transform "Displacement")' in text and "// (NumberOfSquaringSteps 0)" in text
    assert _settings('(Transform "Displacement")') == default


def test_cli_check_names_a_diffeomorphic_transform(cli, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('(Transform "Diffeomorphic")\n')
    result = _invoke(cli, "params", "check", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{path}: OK (1 key; metrics MSE+NCC 0.5/0.5, 3 resolutions, iterations 150 80 30, "
                             "Diffeomorphic transform)\n")


def test_squaring_step_limit_agrees_with_warp():
    from combireg import params, warp

    assert params.MAX_SQUARING_STEPS == warp.MAX_SQUARING_STEPS


def test_readme_documents_the_transform_keys():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip() for line in readme.splitlines() if line.startswith("| `")}
    assert {"`Transform`", "`NumberOfSquaringSteps`"} <= rows
