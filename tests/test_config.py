"""The budgets file: YAML (or a dict) to frozen, validated policy objects."""

from __future__ import annotations

import os
import re
import textwrap
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from payi_guard.config import (
    MAX_AMOUNT,
    NANO_USD,
    STORAGE_SCHEMES,
    AnonymousPolicy,
    GuardConfig,
    LimitSpec,
    PriceOverride,
    UnknownModelPolicy,
    check_file,
    config_fingerprint,
    describe,
    load_config,
    parse_config,
    redact_uri,
)
from payi_guard.config import yaml_tree as _yaml
from payi_guard.exceptions import ConfigError

CONFIGS = Path(__file__).parent / "configs"
BAD_FILES = sorted((CONFIGS / "bad").glob("*.yaml"))
GOOD_FILES = sorted((CONFIGS / "good").glob("*.yaml"))
EXPECT = re.compile(r"# expect: line (\d+): (.+)")
USD = NANO_USD


def limits_yaml(body: str) -> str:
    """A document with one named limit ``x`` whose mapping is ``body``."""
    return f"version: 1\nlimits:\n  x: {{{body}}}\n"


def error_of(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value


# -- the DESIGN.md example ---------------------------------------------------------------


def test_design_example_loads_to_the_expected_policy() -> None:
    path = CONFIGS / "good" / "design_example.yaml"
    config = load_config(path)

    daily = LimitSpec("daily", "usd", 1 * USD, "day")
    monthly = LimitSpec("monthly", "usd", 20 * USD, "month", warn_at=Fraction(4, 5))
    soft = LimitSpec("soft", "usd", 5 * USD, "week", type="allow")
    rpm = LimitSpec("rpm", "requests", 30, "minute")
    tph = LimitSpec("tph", "tokens", 200_000, "hour")
    pro = (LimitSpec("user:0", "usd", 10 * USD, "day"), monthly, rpm)

    assert config.version == 1
    assert config.storage == "memory://"
    assert config.on_storage_error == "block"
    assert config.unknown_model == UnknownModelPolicy("block")
    assert dict(config.prices) == {
        "my-finetune": PriceOverride(Decimal("1.0"), Decimal("2.0")),
    }
    assert dict(config.limits) == {
        "daily": daily,
        "monthly": monthly,
        "soft": soft,
        "rpm": rpm,
        "tph": tph,
    }
    assert list(config.limits) == ["daily", "monthly", "soft", "rpm", "tph"]
    assert config.default == (daily, monthly, rpm)
    assert dict(config.tiers) == {"pro": pro}
    assert dict(config.users) == {"acme:alice": pro, "system_bot": ()}
    assert dict(config.user_tiers) == {"acme:alice": "pro"}
    assert dict(config.orgs) == {"acme": (LimitSpec("org:0", "usd", 100 * USD, "month"),)}
    assert config.global_limits == (LimitSpec("global:0", "usd", 1000 * USD, "month"),)
    assert config.anonymous == AnonymousPolicy(
        "shared", (LimitSpec("anonymous:0", "usd", 100_000_000, "day"),)
    )
    assert config.timezone == "UTC"
    assert config.reservation_ttl == 300.0
    assert config.source == str(path)
    # Lines point back at the file (line 1 of the copy is `version: 1`).
    assert [spec.line for spec in config.limits.values()] == [8, 9, 10, 11, 12]
    assert config.anonymous.limits[0].line == 22
    assert monthly.max_display() == Decimal(20)


def test_every_field_is_parsed() -> None:
    config = load_config(CONFIGS / "good" / "every_field.yaml")
    paris = "Europe/Paris"

    assert config.storage == "redis://:s3cret@127.0.0.1:6379/2"
    assert config.on_storage_error == "allow"
    assert config.unknown_model == UnknownModelPolicy(
        "price", PriceOverride(Decimal(10), Decimal(30), Decimal(1), Decimal("12.5"))
    )
    assert config.prices["ft:gpt-4o-mini:acme::abc123"] == PriceOverride(
        Decimal("0.3"), Decimal("1.2"), Decimal("0.15"), Decimal("0.375")
    )
    assert config.prices["my-finetune"].cache_read_per_mtok is None
    assert config.timezone == paris
    assert config.reservation_ttl == 90.5

    limits = config.limits
    assert limits["daily"] == LimitSpec("daily", "usd", USD, "day", timezone=paris)
    assert limits["soft"].type == "allow"
    assert not limits["soft"].blocks
    assert limits["rpm"].blocks
    assert limits["tph"] == LimitSpec("tph", "tokens", 200_000, "hour", timezone="UTC")
    assert limits["project-x.v2"].max == 1  # one nano-dollar
    assert config.tiers["free"][1] == LimitSpec(
        "user:1", "requests", 5, "minute", warn_at=Fraction(333, 1000), timezone=paris
    )
    # Keys keep the text as written: `007` is not the int 7 and `no` is not False.
    assert dict(config.user_tiers) == {"acme:alice": "pro", "007": "free"}
    assert config.users["007"] == config.tiers["free"]
    assert config.users["system_bot"] == ()
    assert config.users["no"] == (
        limits["soft"],
        LimitSpec("user:1", "tokens", 1000, "day", timezone="America/New_York"),
    )
    assert config.orgs["globex"] == ()
    assert config.global_limits[1] is limits["tph"]
    assert config.anonymous.strategy == "session"
    assert config.anonymous.limits[1] is limits["rpm"]


@pytest.mark.parametrize("path", GOOD_FILES, ids=lambda p: p.name)
def test_good_files_load_and_describe(path: Path) -> None:
    config = check_file(path)
    assert isinstance(config, GuardConfig)
    summary = describe(config)
    assert f"{len(config.limits)} named limit" in summary
    assert summary.endswith(f"; fingerprint {config_fingerprint(config)}")
    assert "\n" not in summary


def test_anchors_and_merge_keys() -> None:
    config = load_config(CONFIGS / "good" / "anchors.yaml")
    daily = config.limits["daily"]
    assert config.limits["daily-soft"] == LimitSpec(
        "daily-soft", "usd", USD, "day", type="allow", warn_at=Fraction(1, 2)
    )
    # Keys written next to `<<` win over the merged ones.
    assert config.limits["weekly"] == LimitSpec(
        "weekly", "usd", 5 * USD, "week", warn_at=Fraction(1, 2)
    )
    assert config.users["alice"] == config.users["bob"] == (daily, config.limits["weekly"])
    assert dict(config.user_tiers) == {"alice": "standard"}


def test_empty_sections_mean_none() -> None:
    config = load_config(CONFIGS / "good" / "empty_sections.yaml")
    assert config == parse_config("version: 1", source=config.source)
    assert config.default == ()
    assert not config.users


# -- the bad corpus ---------------------------------------------------------------------


def test_bad_corpus_is_complete() -> None:
    # Guards against a glob that silently finds nothing (no parametrized case would run).
    assert len(BAD_FILES) >= 25
    for path in BAD_FILES:
        assert EXPECT.match(path.read_text(encoding="utf-8").splitlines()[0]), path.name


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.name)
def test_bad_file_names_line_and_problem(path: Path) -> None:
    match = EXPECT.match(path.read_text(encoding="utf-8").splitlines()[0])
    assert match is not None
    line, expected = int(match.group(1)), match.group(2)

    with pytest.raises(ConfigError) as caught:
        check_file(path)

    error = caught.value
    assert error.line == line, str(error)
    assert expected in error.message
    assert error.file == str(path)
    assert str(error).startswith(f"{path}:{line}: ")


PYYAML_WORDING = (
    "<block",
    "<scalar>",
    "<flow",
    "<stream",
    "<document",
    "simple key",
    "while parsing",
    "while scanning",
    "but found",
    "but got",
    "not allowed here",
)


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.name)
def test_syntax_errors_are_said_in_plain_words(path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        check_file(path)
    for wording in PYYAML_WORDING:
        assert wording not in caught.value.message


_EDITS = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=1),
        st.sampled_from(
            [
                " ",
                "\n",
                "\t",
                ":",
                "-",
                "[",
                "]",
                "{",
                "}",
                ",",
                "'",
                '"',
                "#",
                "&",
                "*",
                "!",
                "|",
                ">",
                "%",
                "@",
                "`",
                "?",
                "  ",
                "\n  ",
                ": ",
                "- ",
                "",
            ]
        ),
        st.integers(min_value=0, max_value=3),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(GOOD_FILES), _EDITS)
def test_any_broken_file_is_a_config_error_in_plain_words(
    path: Path, edits: list[tuple[float, str, int]]
) -> None:
    text = path.read_text(encoding="utf-8")
    for where, insert, delete in edits:
        at = int(where * len(text))
        text = text[:at] + insert + text[at + delete :]
    message = ""
    try:
        parse_config(text)
    except ConfigError as exc:  # anything else (a crash in the messages) fails the test
        message = exc.message
    assert not any(wording in message for wording in PYYAML_WORDING[:5]), message


def test_the_yaml_corpus_covers_the_common_mistakes() -> None:
    names = {path.name for path in BAD_FILES}
    assert {
        "yaml_indent_deeper.yaml",
        "yaml_indent_shallower.yaml",
        "yaml_value_runs_on.yaml",
        "yaml_unclosed_mapping.yaml",
        "yaml_missing_colon.yaml",
        "yaml_unclosed_quote.yaml",
        "yaml_no_space_after_colon.yaml",
        "syntax_error.yaml",
    } <= names


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ("limts: {}", "limts"),
        ("limits:\n  daily: {max: 1, per: dya}", "limits.daily.per"),
        (
            "limits:\n  d: {max: 1, per: day}\ntiers:\n  pro: [d, {max: 0.1, per: wek}]",
            "tiers.pro[1].per",
        ),
        ("users:\n  john.doe: [{max: 1, per: day, type: x}]", 'users."john.doe"[0].type'),
        ("orgs:\n  acme: [{max: -1, per: day}]", "orgs.acme[0].max"),
        ("anonymous: {limits: [{requests: 0, per: day}]}", "anonymous.limits[0].requests"),
        ("prices:\n  m: {input_per_mtok: x, output_per_mtok: 1}", "prices.m.input_per_mtok"),
    ],
)
def test_errors_name_the_dotted_key(document: str, key: str) -> None:
    assert error_of(document).key == key


def test_yaml_text_without_a_file_names_the_line() -> None:
    error = error_of("version: 1\nlimits:\n  daily: {max: 1.00, per: dya}\n")
    assert (error.file, error.line, error.key) == (None, 3, "limits.daily.per")
    assert str(error) == "line 3: limits.daily.per: unknown period 'dya'; did you mean 'day'?"


def test_unknown_key_without_a_near_miss_lists_the_keys() -> None:
    error = error_of(limits_yaml("max: 1, per: day, colour: red"))
    assert error.message == (
        "unknown key 'colour'; limit keys are: max, requests, tokens, per, type, warn_at, timezone"
    )


# -- integers read as they look -------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "text", "read_as"),
    [
        ("max", "0100", "64"),
        ("max", "010", "8"),
        ("max", "1:30", "90"),
        ("requests", "010", "8"),
        ("tokens", "1:00:00", "3600"),
    ],
)
def test_an_octal_or_base_60_integer_is_refused(
    tmp_path: Path, field: str, text: str, read_as: str
) -> None:
    limit = f"{{{field}: {text}, per: day}}"
    path = tmp_path / "budgets.yaml"
    path.write_text(f"version: 1\ndefault:\n  - {limit}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == 3
    assert f"YAML reads {text} as {read_as}" in str(info.value)
    assert "write it in plain decimal" in str(info.value)


def test_a_ttl_written_with_a_leading_zero_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("version: 1\nreservation_ttl: 0600\ndefault: []\n")
    with pytest.raises(ConfigError, match="YAML reads 0600 as 384"):
        load_config(path)


# -- money is exact -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nano"),
    [
        ("0.1", 100_000_000),
        ("0.10", 100_000_000),
        ("1", 1_000_000_000),
        ("1.00", 1_000_000_000),
        ("0.000000001", 1),
        ("1_000.5", 1_000_500_000_000),
        ('"2.50"', 2_500_000_000),
        ("0x10", 16_000_000_000),
        ("9007199.254740991", MAX_AMOUNT),
    ],
)
def test_money_is_read_from_the_text(text: str, nano: int) -> None:
    assert parse_config(limits_yaml(f"max: {text}, per: day")).limits["x"].max == nano


@given(
    st.decimals(
        min_value=Decimal("0.000000001"),
        max_value=Decimal("9000000"),
        places=9,
        allow_nan=False,
        allow_infinity=False,
    ),
    st.booleans(),
)
def test_any_amount_with_nine_decimals_round_trips_exactly(amount: Decimal, trim: bool) -> None:
    text = format(amount.normalize() if trim else amount, "f")
    nano = int(amount * NANO_USD)
    assert Decimal(nano) == amount.scaleb(9)

    from_yaml = parse_config(limits_yaml(f"max: {text}, per: day")).limits["x"]
    from_str = parse_config({"limits": {"x": {"max": text, "per": "day"}}}).limits["x"]
    from_decimal = parse_config({"limits": {"x": {"max": amount, "per": "day"}}}).limits["x"]

    assert from_yaml.max == from_str.max == from_decimal.max == nano
    assert from_yaml.max_display() == amount


@given(
    st.decimals(
        min_value=Decimal("0.000001"),
        max_value=Decimal("1000000"),
        places=6,
        allow_nan=False,
        allow_infinity=False,
    )
)
def test_python_floats_are_read_through_their_repr(amount: Decimal) -> None:
    # Up to 13 significant digits a float's repr is the decimal it was written as.
    value = float(amount)
    spec = parse_config({"limits": {"x": {"max": value, "per": "day"}}}).limits["x"]
    assert spec.max == int(amount * NANO_USD)


@given(
    st.decimals(min_value=0, max_value=1000, places=9, allow_nan=False, allow_infinity=False),
    st.integers(min_value=1, max_value=9),
)
def test_a_tenth_decimal_is_refused(amount: Decimal, extra: int) -> None:
    text = format(amount + Decimal(extra).scaleb(-10), "f")
    error = error_of(limits_yaml(f"max: {text}, per: day"))
    assert "more precise than the smallest unit" in error.message


def test_float_point_one_is_exact() -> None:
    # 0.1 as a binary float is 0.1000000000000000055...; it must not leak into the ledger.
    config = parse_config({"limits": {"x": {"max": 0.1, "per": "day"}}})
    assert config.limits["x"].max == 100_000_000


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("max: 1e-10, per: day", "more precise than the smallest unit"),  # str in YAML 1.1
        ("max: 1.0e+999999999, per: day", "out of range"),
        ("max: .nan, per: day", "expected an amount in USD"),
        ("max: null, per: day", "got no value"),
        ("max: [1], per: day", "got a list"),
        ("max: yes, per: day", "got a boolean (yes)"),
        ("max: 9007199.254740992, per: day", "too large"),
        (
            "requests: 1.0, per: minute",
            "requests must be a positive whole number, got the number 1.0",
        ),
        ("requests: -3, per: minute", "requests must be more than 0, got -3"),
        (
            "tokens: '100', per: hour",
            "tokens must be a positive whole number, got the string '100'",
        ),
        ("max: 1, per: day, warn_at: 0", "more than 0 and at most 1"),
        ("max: 1, per: day, warn_at: false", "got a boolean (false)"),
        ("max: 1, per: day, type: Block", "did you mean 'block'?"),
        ("max: 1, per: daily", "did you mean 'day'?"),
        ("max: 1, per: 1", "expected one of minute, hour, day, week, month, got the number 1"),
        ("max: 1, requests: 2, tokens: 3, per: day", "both 'max' and 'requests'"),
    ],
)
def test_limit_values_are_validated(body: str, message: str) -> None:
    error = error_of(limits_yaml(body))
    assert message in error.message
    assert error.line == 3


def test_warn_at_is_an_exact_fraction() -> None:
    config = parse_config(
        "limits:\n"
        "  a: {max: 1, per: day, warn_at: 0.8}\n"
        "  b: {max: 1, per: day, warn_at: 0.333}\n"
        "  c: {max: 1, per: day, warn_at: 1}\n"
    )
    assert [spec.warn_at for spec in config.limits.values()] == [
        Fraction(4, 5),
        Fraction(333, 1000),
        Fraction(1),
    ]
    from_float = parse_config({"limits": {"a": {"max": 1, "per": "day", "warn_at": 0.1}}})
    assert from_float.limits["a"].warn_at == Fraction(1, 10)


# -- the dict form --------------------------------------------------------------------------


DESIGN_AS_DICT: dict[str, Any] = {
    "version": 1,
    "storage": "memory://",
    "on_storage_error": "block",
    "unknown_model": "block",
    "prices": {"my-finetune": {"input_per_mtok": Decimal("1.0"), "output_per_mtok": "2.0"}},
    "limits": {
        "daily": {"max": 1.00, "per": "day"},
        "monthly": {"max": Decimal("20.00"), "per": "month", "warn_at": 0.8},
        "soft": {"max": "5.00", "per": "week", "type": "allow"},
        "rpm": {"requests": 30, "per": "minute"},
        "tph": {"tokens": 200_000, "per": "hour"},
    },
    "default": ["daily", "monthly", "rpm"],
    "tiers": {"pro": [{"max": 10, "per": "day"}, "monthly", "rpm"]},
    "users": {"acme:alice": "pro", "system_bot": []},
    "orgs": {"acme": [{"max": 100.0, "per": "month"}]},
    "global": ({"max": 1000, "per": "month"},),
    "anonymous": {"strategy": "shared", "limits": [{"max": 0.1, "per": "day"}]},
}


def test_a_dict_gives_the_same_config_as_the_yaml() -> None:
    text = (CONFIGS / "good" / "design_example.yaml").read_text(encoding="utf-8")
    from_yaml = parse_config(text)
    from_dict = parse_config(DESIGN_AS_DICT)
    assert from_dict == from_yaml
    assert config_fingerprint(from_dict) == config_fingerprint(from_yaml)
    assert all(spec.line is None for spec in from_dict.limits.values())


@pytest.mark.parametrize("name", ["design_example.yaml", "anchors.yaml", "minimal.yaml"])
def test_safe_loaded_yaml_gives_the_same_config(name: str) -> None:
    text = (CONFIGS / "good" / name).read_text(encoding="utf-8")
    assert parse_config(yaml.safe_load(text)) == parse_config(text)


def test_dict_errors_name_the_key_without_a_line() -> None:
    data = {"limits": {"daily": {"max": 1, "per": "dya"}}}
    error = error_of(data)
    assert (error.line, error.key) == (None, "limits.daily.per")
    assert str(error) == "limits.daily.per: unknown period 'dya'; did you mean 'day'?"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"limits": {"x": {"requests": True, "per": "minute"}}}, "got a boolean (True)"),
        ({"limits": {"x": {"max": 1e-10, "per": "day"}}}, "more precise than the smallest unit"),
        ({"limits": {"x": {"max": float("inf"), "per": "day"}}}, "got inf"),
        ({"limits": {"x": {"max": Fraction(1, 3), "per": "day"}}}, "expected an amount in USD"),
        ({"users": {True: []}}, "keys must be strings, not bool"),
        ({"users": {7: [], "7": []}}, "duplicate key '7'"),
        ({"storage": 5}, "got the number 5"),
        ({"limits": {"x": {"max": 1, "per": "day"}}, "default": {"x"}}, "unsupported value"),
        ({"version": "1"}, "version is the number 1, not the text '1'"),
    ],
)
def test_dict_values_are_validated(data: dict[Any, Any], message: str) -> None:
    assert message in error_of(data).message


def test_dict_accepts_int_user_ids() -> None:
    config = parse_config({"users": {42: []}})
    assert dict(config.users) == {"42": ()}


def test_parse_config_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="a mapping or YAML text"):
        parse_config(b"version: 1")  # type: ignore[arg-type]


def test_a_path_given_as_text_gets_a_hint() -> None:
    error = error_of("budgets.yaml")
    assert error.message == (
        "the top level must be a mapping of settings (version, storage, limits, ...), "
        "not the string 'budgets.yaml' (parse_config() reads YAML text; "
        "to read a file, use Guard.from_yaml(path) or load_config(path))"
    )
    assert error.line == 1


# -- the result is frozen -------------------------------------------------------------------


def test_every_mapping_is_read_only() -> None:
    config = load_config(CONFIGS / "good" / "every_field.yaml")
    for name in ("prices", "limits", "tiers", "users", "user_tiers", "orgs"):
        mapping = getattr(config, name)
        assert isinstance(mapping, MappingProxyType), name
        with pytest.raises(TypeError):
            mapping["new"] = ()  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.storage = "redis://"  # type: ignore[misc]


# -- names, scopes, references ----------------------------------------------------------------


def test_inline_limits_are_named_by_scope_and_index() -> None:
    config = parse_config(
        textwrap.dedent(
            """\
            limits:
              daily: {max: 1, per: day}
            default: [daily, {requests: 5, per: minute}]
            tiers:
              pro: [{max: 10, per: day}, daily, {tokens: 9, per: hour}]
            users:
              "acme:alice": [daily, {max: 2, per: day}]
            orgs:
              acme: [{max: 100, per: month}]
            global: [{max: 1000, per: month}]
            anonymous: {limits: [{max: 0.1, per: day}]}
            """
        )
    )
    assert [spec.name for spec in config.default] == ["daily", "user:1"]
    assert [spec.name for spec in config.tiers["pro"]] == ["user:0", "daily", "user:2"]
    assert [spec.name for spec in config.users["acme:alice"]] == ["daily", "user:1"]
    assert config.orgs["acme"][0].name == "org:0"
    assert config.global_limits[0].name == "global:0"
    assert config.anonymous.limits[0].name == "anonymous:0"


def test_references_are_resolved_whatever_the_order_in_the_file() -> None:
    config = parse_config(
        "users: {bob: pro}\ntiers: {pro: [daily]}\nlimits: {daily: {max: 1, per: day}}\n"
    )
    assert config.users["bob"] == (config.limits["daily"],)


def test_unknown_limit_with_no_named_limits_says_where_to_define_it() -> None:
    error = error_of("default: [daily]")
    assert error.message == "unknown limit 'daily'; define it under 'limits:'"
    assert (error.line, error.key) == (1, "default[0]")


@pytest.mark.parametrize(
    "user_id", ["alice", "acme:alice", "a.b-c_d", "org:team:user", "12345", "no", "on"]
)
def test_valid_user_ids_are_accepted(user_id: str) -> None:
    assert user_id in parse_config(f"users:\n  {user_id}: []\n").users


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ('"acme:"', "non-empty segments"),
        ('"café"', "U+00E9"),
        ('""', "it is empty"),
        ('"' + "a" * 129 + '"', "129 characters long"),
    ],
)
def test_invalid_user_ids_are_refused(key: str, reason: str) -> None:
    error = error_of(f"version: 1\nusers:\n  {key}: []\n")
    assert error.message.startswith("invalid user id: ")
    assert reason in error.message
    assert error.line == 3


def test_invalid_org_id_is_refused() -> None:
    error = error_of("orgs:\n  'ac me': []\n")
    assert error.message.startswith("invalid org id: it contains whitespace")
    assert error.line == 2


# -- top-level settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme", [scheme for scheme in STORAGE_SCHEMES if scheme not in ("memory", "sqlite")]
)
def test_every_redis_flavour_is_accepted(scheme: str) -> None:
    uri = f"{scheme}://user:pw@cache.internal:6380/1"
    assert parse_config({"storage": uri}).storage == uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "http://db/x",
            "unsupported storage scheme 'http://'; supported are memory://, sqlite://, redis://",
        ),
        ("memory://x", "memory storage takes no address"),
        ("redis://host:99999999/0", "invalid storage URI: Port out of range"),
        ("", "has no value"),
    ],
)
def test_storage_uri_is_checked(uri: str, message: str) -> None:
    assert message in error_of(f"storage: {uri}\n").message


@pytest.mark.parametrize(
    "uri",
    [
        "redis+sentinel://:pw@s1:26379,s2,s3:26380/mymaster/0?ssl=true",
        "valkey+cluster://n1:7000,n2:7001",
        "redis+unix:///var/run/redis.sock?db=2",
    ],
)
def test_multi_host_and_socket_uris_are_accepted(uri: str) -> None:
    assert parse_config({"storage": uri}).storage == uri


def test_tls_flavours_of_sentinel_and_cluster_use_the_ssl_option() -> None:
    message = error_of("storage: rediss+cluster://n1:7000").message
    assert message.startswith("unsupported storage scheme 'rediss+cluster://'; did you mean")


def test_storage_scheme_is_case_insensitive() -> None:
    assert parse_config("storage: Redis://host:6379").storage == "redis://host:6379"


def test_timezone_default_applies_to_limits_without_their_own() -> None:
    config = parse_config(
        "timezone: Asia/Tokyo\n"
        "limits:\n"
        "  a: {max: 1, per: day}\n"
        "  b: {max: 1, per: day, timezone: UTC}\n"
        "global: [{max: 1, per: month}]\n"
    )
    assert config.timezone == "Asia/Tokyo"
    assert config.limits["a"].timezone == "Asia/Tokyo"
    assert config.limits["b"].timezone == "UTC"
    assert config.global_limits[0].timezone == "Asia/Tokyo"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("unknown_model: allow", UnknownModelPolicy("allow")),
        ("unknown_model: block", UnknownModelPolicy("block")),
        (
            "unknown_model: {input_per_mtok: 0, output_per_mtok: 0.5}",
            UnknownModelPolicy("price", PriceOverride(Decimal(0), Decimal("0.5"))),
        ),
    ],
)
def test_unknown_model_policies(document: str, expected: UnknownModelPolicy) -> None:
    assert parse_config(document).unknown_model == expected


def test_missing_key_points_at_the_key_that_owns_the_mapping() -> None:
    error = error_of("version: 1\nunknown_model:\n  input_per_mtok: 10\n")
    assert (error.line, error.key) == (2, "unknown_model")
    error = error_of("limits:\n  daily:\n    max: 1\n")
    assert (error.line, error.key) == (2, "limits.daily.per")


def test_unknown_model_list_is_refused() -> None:
    assert "got a list" in error_of("unknown_model: [block]").message


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("anonymous: reject", AnonymousPolicy("reject")),
        ("anonymous: session", AnonymousPolicy("session")),
        ("anonymous: {strategy: reject}", AnonymousPolicy("reject")),
        (
            "anonymous: {limits: [{requests: 3, per: minute}]}",
            AnonymousPolicy("shared", (LimitSpec("anonymous:0", "requests", 3, "minute"),)),
        ),
    ],
)
def test_anonymous_policies(document: str, expected: AnonymousPolicy) -> None:
    assert parse_config(document).anonymous == expected


@pytest.mark.parametrize(("text", "seconds"), [("1", 1.0), ("0.25", 0.25), ("3600", 3600.0)])
def test_reservation_ttl(text: str, seconds: float) -> None:
    assert parse_config(f"reservation_ttl: {text}").reservation_ttl == seconds


def test_defaults_of_an_empty_mapping() -> None:
    assert parse_config({}) == GuardConfig()
    assert parse_config("{}") == GuardConfig()


def test_version_one_must_be_an_integer() -> None:
    assert "unsupported version 1.0" in error_of("version: 1.0").message
    assert error_of('version: "1"').message == "version is the number 1, not the text '1'"


@pytest.mark.parametrize("user", ["anonymous", "anonymous:kiosk"])
def test_an_anonymous_id_under_users_is_refused(user: str) -> None:
    # It would never apply: such an id is always the anonymous bucket.
    error = error_of(f"users:\n  {user}: []\n")
    assert error.line == 2
    assert "is the anonymous bucket, never a user" in error.message
    assert "`anonymous: {limits: [...]}`" in error.message


# -- YAML hazards ---------------------------------------------------------------------------


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    error = error_of("\n".join(lines) + "\n")
    assert "expands to more than" in error.message


def test_recursive_alias_is_refused() -> None:
    error = error_of("default: &loop [*loop]\n")
    assert "nested deeper than" in error.message
    assert error.line == 1


@pytest.mark.parametrize(
    ("form", "depth"),
    # 5,000 block levels would be 25 MB of indentation: refused for its size instead.
    [("flow", 66), ("flow", 500), ("flow", 5_000), ("block", 66), ("block", 500)],
)
def test_deep_nesting_is_a_config_error_naming_the_limit(depth: int, form: str) -> None:
    if form == "flow":
        document = "version: 1\nlimits:\n  x: " + "[" * depth + "]" * depth + "\n"
    else:
        document = "version: 1\nlimits:\n" + "".join(
            "  " * (i + 1) + f"k{i}:\n" for i in range(depth)
        )
    error = error_of(document)  # never a RecursionError
    assert error.message.startswith(f"nested deeper than {_yaml.MAX_DEPTH} levels")
    assert error.line is not None
    assert 3 <= error.line <= 3 + _yaml.MAX_DEPTH + 1


def test_an_oversized_document_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    limit = _yaml.MAX_DOCUMENT_BYTES
    assert limit == 1 << 20
    # One byte over the limit, as text and as a file; the limit itself is fine.
    filler = "# " + "x" * 97 + "\n"
    at_limit = "version: 1\n" + filler * ((limit - 11) // 100)
    at_limit += "#" * (limit - len(at_limit.encode()) - 1) + "\n"
    assert len(at_limit.encode()) == limit
    assert parse_config(at_limit).version == 1
    error = error_of(at_limit + "\n")
    assert error.message == (
        f"the document is {limit + 1:,} bytes; a budgets file may be at most "
        f"{limit:,} bytes (1 MiB)"
    )
    # Multi-byte characters count as the bytes they take in UTF-8.
    assert "at most" in error_of("version: 1\n#" + "é" * (limit // 2)).message
    # A huge file (sparse: nothing is written to disk) is refused from its size alone.
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as handle:
        handle.truncate(64 << 20)
    with pytest.raises(ConfigError) as caught:
        load_config(huge)
    assert caught.value.file == str(huge)
    assert caught.value.message == (
        f"the file is {64 << 20:,} bytes; a budgets file may be at most {limit:,} bytes (1 MiB)"
    )


def test_python_recursive_structure_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert "nested deeper than" in error_of({"default": loop}).message


def test_alias_budget_grows_with_the_document(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no allowance for aliases at all, an alias-free document still fits (it never
    # holds more values than characters), whatever its size; any expansion does not.
    monkeypatch.setattr(_yaml, "ALIAS_EXPANSION", 0)
    users = "".join(f"  user{i}: [{{requests: {i + 1}, per: minute}}]\n" for i in range(2_000))
    config = parse_config("users:\n" + users)
    assert config.users["user1999"][0].max == 2_000
    assert load_config(CONFIGS / "good" / "every_field.yaml").users
    doubled = (
        "a: &a [1, 2, 3, 4, 5, 6, 7, 8]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b]\n"
    )
    assert "expands to more than" in error_of(doubled).message


def test_unsafe_tags_are_never_constructed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    document = f"storage: !!python/object/apply:os.system ['touch {marker}']\n"
    assert "unsupported YAML tag" in error_of(document).message
    assert not marker.exists()


def test_duplicate_key_in_a_flow_mapping() -> None:
    error = error_of("limits:\n  d: {max: 1, per: day, max: 2}\n")
    assert error.message.startswith("duplicate key 'max' (first defined on line 2)")
    assert (error.line, error.key) == (2, "limits.d.max")


def test_a_key_next_to_a_merge_overrides_it() -> None:
    config = parse_config("limits:\n  d: {<<: {max: 1, per: day}, max: 2}\n")
    assert config.limits["d"] == LimitSpec("d", "usd", 2 * USD, "day")


# -- files ----------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.file == str(path)
    assert str(caught.value) == f"{path}: no such file"


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("version: 1\n", encoding="utf-8")
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(path)


def test_path_through_a_file_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read the file: Not a directory"):
        load_config(plain / "budgets.yaml")


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\nusers:\n  jos\xe9: []\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert (caught.value.line, caught.value.message) == (3, "the file is not UTF-8 text")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfversion: 1\nstorage: memory://\n")
    assert load_config(path).source == str(path)


def test_check_file_is_load_config() -> None:
    path = CONFIGS / "good" / "design_example.yaml"
    assert check_file(path) == load_config(path)


# -- fingerprint and summary -------------------------------------------------------------------


def test_fingerprint_ignores_form_and_follows_policy() -> None:
    base = load_config(CONFIGS / "good" / "design_example.yaml")
    same = parse_config(
        textwrap.dedent(
            """\
            # the same policy, written differently
            anonymous: {limits: [{per: day, max: 0.1}], strategy: shared}
            limits:
              daily: {per: day, max: 1}
              monthly: {max: 20, warn_at: 0.80, per: month}
              soft: {max: 5.000, per: week, type: allow}
              rpm: {requests: 30, per: minute}
              tph: {tokens: 200000, per: hour}
            prices: {my-finetune: {input_per_mtok: 1, output_per_mtok: 2.00}}
            default: [daily, monthly, rpm]
            tiers: {pro: [{max: 10, per: day}, monthly, rpm]}
            users: {"acme:alice": pro, system_bot: []}
            orgs: {acme: [{max: 100, per: month}]}
            global: [{max: 1000, per: month}]
            """
        ),
        source="elsewhere.yaml",
    )
    fingerprint = config_fingerprint(base)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert config_fingerprint(same) == fingerprint
    assert config_fingerprint(load_config(CONFIGS / "good" / "design_example.yaml")) == fingerprint

    text = (CONFIGS / "good" / "design_example.yaml").read_text(encoding="utf-8")
    changed = parse_config(text.replace("{max: 1.00, per: day}", "{max: 1.01, per: day}"))
    assert config_fingerprint(changed) != fingerprint
    retimed = parse_config(text + "timezone: Europe/Paris\n")
    assert config_fingerprint(retimed) != fingerprint


def test_fingerprint_ignores_storage_password() -> None:
    one = parse_config({"storage": "redis://:first@host:6379/0"})
    two = parse_config({"storage": "redis://:second@host:6379/0"})
    other_host = parse_config({"storage": "redis://:first@other:6379/0"})
    assert config_fingerprint(one) == config_fingerprint(two)
    assert config_fingerprint(one) != config_fingerprint(other_host)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://alice:s3cret@host/0", "rediss://alice:***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("memory://", "memory://"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("redis://token@host:6379/0", "redis://***@host:6379/0"),
        ("valkey+cluster://secret@h1:7000,h2:7001", "valkey+cluster://***@h1:7000,h2:7001"),
        ("redis://alice:@host", "redis://***@host"),
        ("redis://:p/w@host/0", "redis://:***@host/0"),
        ("redis://:p@ss@host/0", "redis://:***@host/0"),
        ("redis+sentinel://:pw@h1:26379,h2/mymaster", "redis+sentinel://:***@h1:26379,h2/mymaster"),
        ("redis://host/0?client_name=a@b", "redis://host/0?client_name=a@b"),
        ("redis://:@host", "redis://:@host"),
        ("not a uri", "not a uri"),
    ],
)
def test_redact_uri_masks_every_credential(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_describe_counts_and_hides_the_password() -> None:
    config = load_config(CONFIGS / "good" / "every_field.yaml")
    summary = describe(config)
    assert summary == (
        "6 named limits, 2 tiers, 4 users, 2 orgs, 2 global limits, 2 price overrides; "
        f"fingerprint {config_fingerprint(config)}"
    )
    lines = describe(config, verbose=True).splitlines()
    assert lines == [
        summary,
        "default limits: daily, monthly, rpm",
        "anonymous: session (anonymous:0, rpm)",
        "unknown models: price (input 10, output 30 USD per million tokens)",
        "storage: redis://:***@127.0.0.1:6379/2 (on error: allow)",
    ]
    assert describe(parse_config("version: 1")).startswith(
        "0 named limits, 0 tiers, 0 users, 0 orgs, 0 global limits, 0 price overrides; "
    )
    assert "anonymous: reject" in describe(parse_config("anonymous: reject"), verbose=True)
    many = "users:\n" + "".join(f"  u{i}: []\n" for i in range(1234))
    assert ", 1,234 users, " in describe(parse_config(many))


# -- sqlite stores named by a budgets file -------------------------------------------------


def test_a_relative_sqlite_store_is_the_budgets_files_neighbour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf dir"
    folder.mkdir()
    budgets = folder / "budgets.yaml"
    budgets.write_text("version: 1\nstorage: sqlite:///state/budgets.db\n", encoding="utf-8")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    storage = load_config(budgets).storage
    assert storage == "sqlite:///" + str(folder).replace(" ", "%20") + "/state/budgets.db"
    absolute = tmp_path / "abs.db"
    budgets.write_text(f"version: 1\nstorage: sqlite:///{absolute}\n", encoding="utf-8")
    assert load_config(budgets).storage == f"sqlite:///{absolute}"
    # Text without a file has no folder: the path is left for the ledger (current directory).
    assert parse_config("version: 1\nstorage: sqlite:///b.db\n").storage == "sqlite:///b.db"


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///", "sqlite://host/b.db", "sqlite:///?x=1"])
def test_a_sqlite_store_must_name_a_file(uri: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("sqlite:///budgets.db")) as info:
        parse_config(f"version: 1\nstorage: {uri}\n")
    assert info.value.line == 2
