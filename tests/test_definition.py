"""Definitions: loading, variable substitution (string.Template semantics), escaping, errors
naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bootstrap.deploy import definition as defn
from bootstrap.errors import UsageError
from bootstrap.runtime.health import HealthCheck


def write_def(root: Path, **files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = {
        "manifest": "manifest.json",
        "config": "config.json.template",
        "service": "service.template",
        "tmpfiles": "tmpfiles.template",
    }
    for key, text in files.items():
        (root / names[key]).write_text(text)
    return root


def test_load_full_definition(tmp_path: Path) -> None:
    d = defn.load(
        write_def(
            tmp_path / "def",
            manifest=json.dumps(
                {"defaultValues": {"PORT": 8080, "DEBUG": False}, "readiness": "notify"}
            ),
            config='{"process": {"args": ["/bin/daemon", "--port=$PORT"]}}',
            service="[Service]\nExecStart=$EXEC_START\n",
            tmpfiles="d /var/lib/$NAME 0755 root root -\n",
        )
    )
    assert d.source == "directory"
    assert d.default_values == {"PORT": "8080", "DEBUG": "false"}
    assert d.readiness == "notify"
    assert d.variables() == {"PORT", "EXEC_START", "NAME"}
    assert d.digest.startswith("sha256:")


def test_substitution_braced_escaped_and_json_escaping() -> None:
    t = defn.TemplateFile("x/config.json.template", '{"a": "${A}x $B $$C"}')
    out = t.render({"A": 'q"uote', "B": "back\\slash\nnl"}, defn.escape_json)
    assert json.loads(out) == {"a": 'q"uotex back\\slash\nnl $C'}


def test_unknown_variable_names_file_and_line() -> None:
    t = defn.TemplateFile("def/service.template", "[Service]\n\nExecStart=$EXEC_START $NOPE\n")
    with pytest.raises(UsageError, match=r"def/service.template:3: unknown variable \$NOPE"):
        t.render({"EXEC_START": "/bin/true"}, defn.unit_escaper("u"))


def test_malformed_dollar_names_file_and_line(tmp_path: Path) -> None:
    write_def(tmp_path / "d", service="[Unit]\nDescription=costs $5\n")
    with pytest.raises(UsageError, match=r"service.template:2: '\$' starts no variable"):
        defn.load(tmp_path / "d")


def test_bad_json_names_file_line_and_column(tmp_path: Path) -> None:
    write_def(tmp_path / "d", manifest='{\n  "defaultValues": {\n    "A": 1,\n  }\n}\n')
    with pytest.raises(UsageError, match=r"manifest.json:4:3: invalid JSON"):
        defn.load(tmp_path / "d")


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("[]", "must be a JSON object"),
        ('{"defaultValues": []}', "defaultValues must be an object"),
        ('{"defaultValues": {"1X": "a"}}', "not a valid variable name"),
        ('{"defaultValues": {"X": {"y": 1}}}', "must be a string, number or boolean"),
        ('{"readiness": "socket"}', "readiness must be one of"),
        ('{"stopTimeout": 0}', "stopTimeout must be a positive integer"),
        ('{"type": "forking"}', "type must be one of service, oneshot, not 'forking'"),
        ('{"type": "oneshot", "readiness": "notify"}', 'a oneshot cannot have readiness "notify"'),
        ('{"type": "oneshot", "health": {"exec": ["/c"]}}', "a oneshot has no health check"),
    ],
)
def test_manifest_shape_errors(tmp_path: Path, manifest: str, message: str) -> None:
    write_def(tmp_path / "d", manifest=manifest)
    with pytest.raises(UsageError, match=message):
        defn.load(tmp_path / "d")


def test_unit_type(tmp_path: Path) -> None:
    assert defn.builtin().unit_type == "service"
    assert defn.load(write_def(tmp_path / "a", manifest="{}")).unit_type == "service"
    one = defn.load(write_def(tmp_path / "b", manifest='{"type": "oneshot"}'))
    assert one.unit_type == "oneshot"
    svc = defn.load(write_def(tmp_path / "c", manifest='{"type": "service"}'))
    assert svc.unit_type == "service"


def test_missing_or_empty_definition_dir(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        defn.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="none of"):
        defn.load(tmp_path / "empty")


def test_symlinked_definition_file_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "service.template").symlink_to("/etc/passwd")
    with pytest.raises(UsageError, match="not a regular file"):
        defn.load(d)


@pytest.mark.parametrize(
    "value", ["a\nExecStartPre=/bin/evil", "x\rY", "tab\there", "nul\x00", "ends\\"]
)
def test_unit_values_cannot_inject(value: str) -> None:
    t = defn.TemplateFile("def/service.template", "[Unit]\nDescription=$DESC\n")
    with pytest.raises(UsageError, match=r"def/service.template:2: value of \$DESC"):
        t.render({"DESC": value}, defn.unit_escaper(t.where))


def test_unit_values_double_percent_but_raw_exec_variables_are_kept() -> None:
    t = defn.TemplateFile("s", "Description=$D\nExecStart=$EXEC_START\n")
    out = t.render(
        {"D": "100% sure", "EXEC_START": "/bin/echo %%"},
        defn.unit_escaper("s", frozenset({"EXEC_START"})),
    )
    assert out == "Description=100%% sure\nExecStart=/bin/echo %%\n"


def test_values_on_exec_lines_are_quoted_as_one_word() -> None:
    esc = defn.unit_escaper("s", frozenset({"EXEC_START"}), commands=True)
    t = defn.TemplateFile(
        "s",
        "Description=$A\n"
        "ExecStart=$EXEC_START\n"
        "ExecStartPre=/bin/x $A --o=$B \"in $C\" \\\n  '$D' $E\n"
        "Environment=X=$A\n",
    )
    out = t.render(
        {"A": "a b", "B": "1%", "C": 'q"$', "D": "it's", "E": "", "EXEC_START": "/bin/run %%"},
        esc,
    )
    assert out.splitlines() == [
        "Description=a b",
        "ExecStart=/bin/run %%",
        'ExecStartPre=/bin/x "a b" --o=1%% "in q\\"$$" \\',
        "  'it\\'s' \"\"",
        "Environment=X=a b",
    ]
    # without commands (tmpfiles), values are only checked and %-doubled
    plain = defn.TemplateFile("t", "ExecStart=$A\n").render({"A": "a b"}, defn.unit_escaper("t"))
    assert plain == "ExecStart=a b\n"


def test_auto_update_and_health(tmp_path: Path) -> None:
    d = defn.load(
        write_def(
            tmp_path / "def",
            manifest=json.dumps(
                {
                    "autoUpdate": "registry",
                    "health": {
                        "exec": ["/bin/check", "-q"],
                        "interval": "500ms",
                        "timeout": 2,
                        "retries": 2,
                        "start_period": "1m",
                    },
                }
            ),
        )
    )
    assert d.auto_update == "registry"
    assert d.health is not None
    assert d.health.argv == ("/bin/check", "-q")
    assert (d.health.interval, d.health.timeout, d.health.retries) == (0.5, 2.0, 2)
    assert d.health.start_period == 60.0
    plain = defn.load(write_def(tmp_path / "plain", manifest="{}"))
    assert plain.auto_update is None and plain.health is None
    web = defn.load(
        write_def(
            tmp_path / "web",
            manifest=json.dumps({"health": {"http": "http://127.0.0.1:10248/healthz"}}),
        )
    )
    assert web.health is not None and web.health.argv == ()
    assert web.health.http == "http://127.0.0.1:10248/healthz"
    assert web.health.describe() == "GET http://127.0.0.1:10248/healthz"
    assert HealthCheck.from_json(web.health.to_json()) == web.health
    assert HealthCheck.from_json(d.health.to_json()) == d.health
    kubelet = defn.load(Path(__file__).resolve().parents[1] / "images" / "kubelet")
    assert kubelet.health is not None and kubelet.health.http.endswith(":10248/healthz")


@pytest.mark.parametrize(
    ("manifest", "word"),
    [
        ({"autoUpdate": "daily"}, "autoUpdate"),
        ({"health": []}, "health: must be an object"),
        ({"health": {"exec": []}}, "health.exec"),
        ({"health": {"exec": "check"}}, "health.exec"),
        ({"health": {"exec": ["c"], "interval": 0}}, "health.interval"),
        ({"health": {"exec": ["c"], "timeout": "soon"}}, "health.timeout"),
        ({"health": {"exec": ["c"], "retries": 0}}, "health.retries"),
        ({"health": {"exec": ["c"], "retries": True}}, "health.retries"),
        ({"health": {"exec": ["c"], "cmd": ["x"]}}, "unknown key 'cmd'"),
        ({"health": {}}, "exactly one of exec and http"),
        ({"health": {"exec": ["c"], "http": "http://127.0.0.1/"}}, "exactly one of exec and http"),
        ({"health": {"http": ""}}, "health.http: must be a URL"),
        ({"health": {"http": ["http://x/"]}}, "health.http: must be a URL"),
        ({"health": {"http": "ftp://127.0.0.1/x"}}, "not an http(s) URL"),
        ({"health": {"http": "http:///healthz"}}, "not an http(s) URL"),
        ({"health": {"http": "http://127.0.0.1:99999/"}}, "is not a URL"),
        ({"health": {"http": "http://u:p@127.0.0.1/"}}, "holds credentials"),
        ({"health": {"http": "http://127.0.0.1/a b"}}, "must be a URL"),
    ],
)
def test_bad_auto_update_and_health(tmp_path: Path, manifest: object, word: str) -> None:
    with pytest.raises(UsageError) as info:
        defn.load(write_def(tmp_path / "def", manifest=json.dumps(manifest)))
    assert word in info.value.message
    assert "manifest.json" in info.value.message
