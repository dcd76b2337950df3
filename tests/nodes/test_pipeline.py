"""Pipeline text parsing (against shlex and a real sh) and placement (a pure function)."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dpipes.bus.errors import DpipesError, StageError
from dpipes.nodes.pipeline import (
    NodeInfo,
    PipelineSyntaxError,
    PlacementError,
    StageSpec,
    check_node_name,
    format_pipeline,
    format_stage,
    parse_pipeline,
    place,
)


def argvs(text: str) -> list[tuple[str, ...]]:
    return [s.argv for s in parse_pipeline(text)]


# -- parsing: examples -----------------------------------------------------------------------------


def test_the_design_example() -> None:
    text = "cat /data/input.txt | sort@beta | uniq -c | python top.py"
    assert parse_pipeline(text) == [
        StageSpec(0, ("cat", "/data/input.txt"), None, "cat /data/input.txt"),
        StageSpec(1, ("sort",), "beta", "sort@beta"),
        StageSpec(2, ("uniq", "-c"), None, "uniq -c"),
        StageSpec(3, ("python", "top.py"), None, "python top.py"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grep 'a|b' f", [("grep", "a|b", "f")]),
        ('grep "a|b" f', [("grep", "a|b", "f")]),
        (r"grep a\|b f", [("grep", "a|b", "f")]),
        ("seq 3|sort -r", [("seq", "3"), ("sort", "-r")]),
        ("  seq\t3  |  wc  ", [("seq", "3"), ("wc",)]),
        ("echo '' \"\" x", [("echo", "", "", "x")]),
        ("echo it''s", [("echo", "its")]),
        ("echo 'a b'\"c d\"e", [("echo", "a bc de")]),
        (r'echo "a\"b" "c\\d" "e\xf" "\$\`"', [("echo", 'a"b', "c\\d", "e\\xf", "$`")]),
        ("echo 'a\\b' 'x\"y'", [("echo", "a\\b", 'x"y')]),
        ("echo a\\\nb", [("echo", "ab")]),
        ("seq 3 |\n  sort\n", [("seq", "3"), ("sort",)]),
        ('echo "line1\nline2"', [("echo", "line1\nline2")]),
        ("printf '$HOME;&<>()`#'", [("printf", "$HOME;&<>()`#")]),
        ("ls *.txt ~/x [ab] {c}", [("ls", "*.txt", "~/x", "[ab]", "{c}")]),
        ("[ -f x ]", [("[", "-f", "x", "]")]),
        ("echo a#b", [("echo", "a#b")]),
        ("env FOO=1 prog", [("env", "FOO=1", "prog")]),
        ("'FOO=1' x", [("FOO=1", "x")]),
        ("héllo wörld | ünï", [("héllo", "wörld"), ("ünï",)]),
    ],
)
def test_quoting_as_in_sh(text: str, expected: list[tuple[str, ...]]) -> None:
    assert argvs(text) == expected


@pytest.mark.parametrize(
    ("text", "argv", "node"),
    [
        ("sort@beta -r", ("sort", "-r"), "beta"),
        ("sort@beta_2-x", ("sort",), "beta_2-x"),
        ("ssh user@host ls", ("ssh", "user@host", "ls"), None),
        ("'sort@beta' -r", ("sort@beta", "-r"), None),
        ("sort\\@beta", ("sort@beta",), None),
        ("'odd@name'@beta x", ("odd@name", "x"), "beta"),
        ("a@b@c", ("a@b",), "c"),
        ("'my prog'@n1 'x y'", ("my prog", "x y"), "n1"),
    ],
)
def test_pins(text: str, argv: tuple[str, ...], node: str | None) -> None:
    [stage] = parse_pipeline(text)
    assert (stage.argv, stage.node, stage.program) == (argv, node, argv[0])


def test_stage_text_is_the_source_slice() -> None:
    stages = parse_pipeline("  grep 'a|b'  |sort@beta  -r ")
    assert [s.text for s in stages] == ["grep 'a|b'", "sort@beta  -r"]
    assert [s.index for s in stages] == [0, 1]


@pytest.mark.parametrize(
    ("text", "column", "stage", "phrase"),
    [
        ("", 1, 0, "empty"),
        ("   ", 1, 0, "empty"),
        ("a || b", 3, 0, "'||'"),
        ("a |", 3, 1, "ends with '|'"),
        ("a | b |  ", 7, 2, "ends with '|'"),
        ("| a", 1, 0, "starts with '|'"),
        ("a | | b", 5, 1, "empty stage"),
        ("a |  |", 6, 1, "empty stage"),
        ("echo 'abc", 6, 0, "unterminated single quote"),
        ('a | echo "abc', 10, 1, "unterminated double quote"),
        ("echo abc\\", 9, 0, "trailing backslash"),
        ("sort@ -r", 5, 0, "bad pin"),
        ("a | sort@ -r", 9, 1, "bad pin"),
        ("sort@be:ta", 5, 0, "not a valid node name"),
        ("@beta x", 1, 0, "without a program"),
        ("'' x", 1, 0, "program name is empty"),
        ("FOO=1 cmd", 1, 0, "environment variable"),
        ("echo $HOME", 6, 0, "'$'"),
        ("a ; b", 3, 0, "';'"),
        ("a && b", 3, 0, "'&'"),
        ("a > f", 3, 0, "redirection"),
        ("a < f", 3, 0, "redirection"),
        ("(a)", 1, 0, "subshell"),
        ("echo `id`", 6, 0, "'`'"),
        ('echo "$x"', 7, 0, "double quotes"),
        ("a # comment", 3, 0, "comment"),
        ("seq 3\nsort", 6, 0, "newline"),
        ("echo a\0b", 7, 0, "NUL"),
        ("echo 'a\0b'", 8, 0, "NUL"),
    ],
)
def test_syntax_errors_name_the_place_and_the_fix(text: str, column: int, stage: int, phrase: str) -> None:
    with pytest.raises(PipelineSyntaxError) as caught:
        parse_pipeline(text)
    err = caught.value
    assert isinstance(caught.value, DpipesError)
    assert isinstance(caught.value, ValueError)
    message = str(err)
    assert phrase in message
    assert f"at column {column}" in message
    assert f"in stage {stage} " in message  # stages count from 0, as --status, --tag and N: options do
    assert (err.position, err.stage) == (column - 1, stage)
    assert message.rstrip().endswith((".", "'")), "ends with what to do"


def test_error_message_points_at_the_column() -> None:
    with pytest.raises(PipelineSyntaxError) as caught:
        parse_pipeline("seq 10 || sort")
    lines = str(caught.value).splitlines()
    assert lines[1] == "  seq 10 || sort"
    assert lines[2] == "  " + " " * 7 + "^"


# -- parsing: properties ---------------------------------------------------------------------------

_args = st.text(st.characters(exclude_characters="\0"), max_size=12)  # surrogates are excluded by default


def _is_assignment_like(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isidentifier() and name.isascii()


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_args, st.lists(_args, max_size=5)), min_size=1, max_size=5))
def test_round_trip_of_shlex_join(stages: list[tuple[str, list[str]]]) -> None:
    # A program word is unquoted by shlex when it only has "safe" characters, '@' and '=' among
    # them: there it means a pin or an environment assignment, as in sh. Those are left out here
    # and covered by format_stage below. A first word starting with '%' names a plugin, whose
    # words are KEY=VALUE: covered by the plugin tests.
    for program, _ in stages:
        assume(program and "@" not in program and not _is_assignment_like(program) and program[0] != "%")
    lists = [[program, *args] for program, args in stages]
    text = " | ".join(shlex.join(argv) for argv in lists)
    parsed = parse_pipeline(text)
    assert [list(s.argv) for s in parsed] == lists
    assert all(s.node is None for s in parsed)


_nodes = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}", fullmatch=True)


_programs = _args.filter(lambda p: bool(p) and not p.startswith("%"))  # a first word %NAME is a plugin


@settings(max_examples=100)
@given(st.lists(st.tuples(_programs, st.lists(_args, max_size=4), st.none() | _nodes), min_size=1, max_size=5))
def test_round_trip_of_format_pipeline(stages: list[tuple[str, list[str], str | None]]) -> None:
    specs = [StageSpec(i, (p, *args), node) for i, (p, args, node) in enumerate(stages)]
    parsed = parse_pipeline(format_pipeline(specs))
    assert [(s.argv, s.node) for s in parsed] == [(s.argv, s.node) for s in specs]


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
            st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), _args, max_size=3),
            st.none() | _nodes,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_plugin_stages_round_trip_with_their_configuration(
    stages: list[tuple[str, dict[str, str], str | None]],
) -> None:
    specs = [
        StageSpec(i, (f"%{name}", *(f"{k}={v}" for k, v in config.items())), node)
        for i, (name, config, node) in enumerate(stages)
    ]
    parsed = parse_pipeline(format_pipeline(specs))
    assert [(s.plugin, s.config, s.node) for s in parsed] == [(n, c, node) for n, c, node in stages]


def test_plugin_stage_words_are_key_value() -> None:
    stage = parse_pipeline('%filter@beta expr="amount > 100" by=a=b')[0]
    assert (stage.plugin, stage.node, stage.config) == ("filter", "beta", {"expr": "amount > 100", "by": "a=b"})
    with pytest.raises(PipelineSyntaxError, match="'x' is not KEY=VALUE"):
        parse_pipeline("cat | %filter x")
    with pytest.raises(PipelineSyntaxError, match="bad plugin name"):
        parse_pipeline("cat | %fi/lter")


@settings(max_examples=200)
@given(st.text(alphabet=st.sampled_from(list("ab@|'\"\\ \t\n$;#=()xy\0é")), max_size=30))
def test_any_text_parses_or_raises_a_syntax_error(text: str) -> None:
    try:
        stages = parse_pipeline(text)
    except PipelineSyntaxError as e:
        assert 0 <= e.position <= len(text)
        return
    assert stages and all(s.argv and s.argv[0] for s in stages)


_quoting = st.text(alphabet=st.sampled_from(list("ab '\"\\\t")), max_size=24)


@settings(max_examples=100)
@given(_quoting)
def test_words_split_like_shlex(words: str) -> None:
    text = "prog " + words
    try:
        expected = shlex.split(text)
    except ValueError:  # unbalanced quotes, trailing backslash
        with pytest.raises(PipelineSyntaxError):
            parse_pipeline(text)
        return
    assert list(parse_pipeline(text)[0].argv) == expected


@settings(max_examples=40, deadline=None)
@given(_quoting.filter(lambda w: "\\" in w or "'" in w or '"' in w))
def test_words_split_like_a_real_sh(words: str) -> None:
    text = "printf '%s\\0' " + words
    try:
        [stage] = parse_pipeline(text)
    except PipelineSyntaxError as e:
        if "trailing backslash" in str(e):
            return  # sh takes a final '\\' literally; dpipes refuses it (likely a mistake)
        done = subprocess.run(["sh", "-c", text], capture_output=True, check=False)
        assert done.returncode != 0  # sh finds the same text malformed
        return
    done = subprocess.run(["sh", "-c", text], capture_output=True, check=True)
    shell_args = done.stdout.decode().split("\0")[:-1]
    assert shell_args == (list(stage.argv[2:]) or [""])  # printf with no argument prints '' once


def test_format_stage_quotes_what_would_be_special() -> None:
    assert format_stage(["sort", "-r"], "beta") == "sort@beta -r"
    assert format_stage(["odd@name", "x@y"]) == "'odd@name' x@y"
    assert format_stage(["A=1", "B=2"]) == "'A=1' B=2"
    assert format_stage(["a b", "it's"]) == "'a b' 'it'\"'\"'s'"
    with pytest.raises(ValueError):
        format_stage([])
    with pytest.raises(ValueError):
        format_stage(["sort"], "bad/node")


def test_check_node_name() -> None:
    assert check_node_name("beta-1_x") is None
    assert check_node_name("n" * 48) is None
    assert check_node_name("") is not None
    for bad in ("-x", "a b", "a@b", "a/b", "a:1", "a.lan", "é", "n" * 49):
        assert check_node_name(bad) is not None, bad


# -- placement -------------------------------------------------------------------------------------


def stages_of(text: str) -> list[StageSpec]:
    return parse_pipeline(text)


TABLE = {
    "alpha": NodeInfo("alpha", frozenset({"cat", "sort"})),
    "beta": NodeInfo("beta", frozenset({"sort", "ffmpeg", "uniq"})),
    "gamma": NodeInfo("gamma", frozenset({"sort", "ffmpeg"})),
}


def test_pinned_stage_goes_to_its_node() -> None:
    placed = place(stages_of("cat f | sort@gamma | wc@alpha"), TABLE, local="alpha")
    assert placed == ["alpha", "gamma", "alpha"]


def test_pin_to_the_local_node_even_if_not_in_the_table() -> None:
    assert place(stages_of("sort@me"), {}, local="me") == ["me"]


def test_unknown_pin_lists_known_nodes() -> None:
    with pytest.raises(PlacementError) as caught:
        place(stages_of("cat f | sort@gama -r"), TABLE, local="alpha")
    message = str(caught.value)
    assert isinstance(caught.value, StageError)
    assert isinstance(caught.value, LookupError)
    assert "stage 1 (sort@gama -r)" in message
    assert "'gama'" in message
    assert "did you mean 'gamma'?" in message
    assert "Known nodes: alpha (local), beta, gamma." in message


def test_advertised_program_goes_to_a_node_offering_it() -> None:
    assert place(stages_of("uniq -c"), TABLE, local="alpha") == ["beta"]
    assert place(stages_of("uniq -c"), TABLE, local="beta") == ["beta"]


def test_unadvertised_program_stays_local() -> None:
    assert place(stages_of("wc -l"), TABLE, local="alpha") == ["alpha"]
    assert place(stages_of("wc -l"), {}, local="solo") == ["solo"]


def test_program_given_as_a_path_stays_local() -> None:
    table = {"beta": NodeInfo("beta", frozenset({"./top.py", "/usr/bin/sort"}))}
    assert place(stages_of("./top.py | /usr/bin/sort"), table, local="alpha") == ["alpha", "alpha"]


def test_repeated_program_spreads_round_robin() -> None:
    placed = place(stages_of("ffmpeg a | ffmpeg b | ffmpeg c"), TABLE, local="alpha")
    assert placed == ["beta", "gamma", "beta"]


def test_round_robin_starts_at_the_local_node_when_it_offers_the_program() -> None:
    text = "sort | uniq | sort | sort | sort"
    assert place(stages_of(text), TABLE, local="gamma") == ["gamma", "beta", "alpha", "beta", "gamma"]


def test_placement_is_stable_and_pure() -> None:
    stages = stages_of("sort | ffmpeg x | sort | cat f | ffmpeg y")
    table_copy = dict(TABLE)
    reversed_table = dict(reversed(list(TABLE.items())))
    first = place(stages, TABLE, local="alpha")
    assert first == place(stages, reversed_table, local="alpha") == place(stages, TABLE, local="alpha")
    assert first == ["alpha", "beta", "beta", "alpha", "gamma"]
    assert TABLE == table_copy
    assert place([], TABLE, local="alpha") == []


def test_node_info_is_frozen() -> None:
    info = NodeInfo("alpha")
    assert info.programs == frozenset()
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "beta"


def test_an_offer_with_fixed_arguments_takes_only_stages_that_start_with_them() -> None:
    from dpipes.nodes.pipeline import LOCAL, OFFERED, PINNED, Placement, placements

    table = {"beta": NodeInfo("beta", frozenset({"sort -r"})), "gamma": NodeInfo("gamma", frozenset({"tr a-z 'A-Z'"}))}
    text = "sort | sort -r | sort -r -n | sort@beta | tr a-z A-Z | tr a-z"
    assert placements(stages_of(text), table, local="alpha") == [
        Placement("alpha", LOCAL),  # `sort` on beta would run `sort -r`: reversed
        Placement("beta", OFFERED, "sort -r"),
        Placement("beta", OFFERED, "sort -r"),
        Placement("beta", PINNED),
        Placement("gamma", OFFERED, "tr a-z 'A-Z'"),
        Placement("alpha", LOCAL),
    ]


def test_the_most_specific_offer_of_a_node_is_named() -> None:
    from dpipes.nodes.pipeline import OFFERED, Placement, placements

    table = {"beta": NodeInfo("beta", frozenset({"sort", "sort -r"}))}
    assert placements(stages_of("sort -r"), table, local="alpha") == [Placement("beta", OFFERED, "sort -r")]
    assert placements(stages_of("sort"), table, local="alpha") == [Placement("beta", OFFERED, "sort")]
