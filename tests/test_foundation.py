"""Foundation: the notebooks are the only source of the package, and the documented way of working
(JupyterLab / a Jupyter server, papermill) stays real."""
import json, os, re, shutil, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_project(dst: Path) -> Path:
    for name in ("pyproject.toml", "nbs", "bctnb", ".ci"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / name)
    return dst


def test_hand_edit_of_package_fails_sync_check_and_is_kept(tmp_path):
    proj = _copy_project(tmp_path)
    core = proj / "bctnb" / "core.py"
    edited = core.read_text() + "\n\ndef sneaky():\n    return 42\n"
    core.write_text(edited)
    p = subprocess.run(["bash", ".ci/check_unchanged.sh", "bctnb", "package out of sync", "--", str(BIN / "nbdev-export")],
                       cwd=proj, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAILED: package out of sync" in p.stdout
    assert "core.py" in p.stdout
    assert core.read_text() == edited          # the check restored the hand edit: no work lost


def test_sync_check_passes_on_exported_package(tmp_path):
    proj = _copy_project(tmp_path)
    p = subprocess.run(["bash", ".ci/check_unchanged.sh", "bctnb", "out of sync", "--", str(BIN / "nbdev-export")],
                       cwd=proj, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_no_settings_ini_and_tags_survive_clean(tmp_path):
    """nbdev-clean must keep papermill's `parameters` tag (allowed_cell_metadata_keys is a TOML list)."""
    import nbformat
    assert not (ROOT / "settings.ini").exists()
    proj = _copy_project(tmp_path)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("steps = 3")
    cell.metadata["tags"] = ["parameters"]
    cell.metadata["scrolled"] = True            # a key nbdev-clean should drop
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    f = proj / "nbs" / "zz_params.ipynb"
    nbformat.write(nb, f)
    subprocess.run([str(BIN / "nbdev-clean")], cwd=proj, check=True, capture_output=True, timeout=120)
    md = nbformat.read(f, as_version=4).cells[0].metadata
    assert md.get("tags") == ["parameters"] and "scrolled" not in md


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method, url, token, body=None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.mark.slow
def test_jupyter_server_lists_and_executes_notebook(tmp_path):
    """`make lab` works: a Jupyter server on loopback lists nbs/ and executes 00_core through its REST + kernel API."""
    import websocket  # websocket-client, a jupyter_server dependency

    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    srv = subprocess.Popen([str(BIN / "jupyter"), "server", "--no-browser", "--ServerApp.ip=127.0.0.1",
                            f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
                            f"--ServerApp.root_dir={ROOT}"] + (["--allow-root"] if os.geteuid() == 0 else []), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                _http("GET", f"{base}/api/status", token); break
            except Exception:
                time.sleep(0.5)
        else:
            pytest.fail("jupyter server did not start")
        listing = _http("GET", f"{base}/api/contents/nbs", token)
        names = {c["name"] for c in listing["content"]}
        assert "00_core.ipynb" in names
        nb = _http("GET", f"{base}/api/contents/nbs/00_core.ipynb", token)["content"]
        kernel = _http("POST", f"{base}/api/kernels", token, {"name": "python3", "path": "nbs"})
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels?token={token}", timeout=120)
        session, executed = uuid.uuid4().hex, 0
        for cell in nb["cells"]:
            if cell["cell_type"] != "code" or "skip-execution" in cell["metadata"].get("tags", []):
                continue
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps({"header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request", "version": "5.3"},
                                "parent_header": {}, "metadata": {}, "channel": "shell",
                                "content": {"code": cell["source"], "silent": False, "store_history": True,
                                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
            while True:
                m = json.loads(ws.recv())
                if m.get("parent_header", {}).get("msg_id") == msg_id and m["msg_type"] == "execute_reply":
                    assert m["content"]["status"] == "ok", (cell["source"][:200], m["content"])
                    break
            executed += 1
        ws.close()
        assert executed >= 10
        _http("DELETE", f"{base}/api/kernels/{kernel['id']}", token)
    finally:
        srv.terminate()
        try: srv.wait(20)
        except subprocess.TimeoutExpired: srv.kill()


# ------------------------------------------------------------------------------------- the package's import graph
# Every `import bctnb.x` / `from bctnb.x import …` / `from .x import …` / `importlib.import_module("bctnb.x")` counts,
# at module level AND inside functions: a function-local import of a later module from an earlier one is a cycle that
# only shows at call time. Imports of packages outside bctnb (optional heavy dependencies loaded lazily) are not edges.
import ast


def bctnb_import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    "module name -> the bctnb modules its source imports anywhere (sources: module name -> Python source)"
    mods = set(sources)
    def target(name):
        parts = (name or "").split(".")
        return parts[1] if parts[0] == "bctnb" and len(parts) > 1 else None
    graph = {}
    for mod, text in sources.items():
        deps = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                deps |= {target(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module == "bctnb" or node.level == 1 and node.module is None:
                    deps |= {a.name for a in node.names}                    # from bctnb import x / from . import x
                elif node.level == 0: deps.add(target(node.module))
                elif node.level == 1: deps.add(node.module.split(".")[0])   # from .x import y
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                deps.add(target(node.args[0].value))
        graph[mod] = (deps & mods) - {mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One import cycle as a path [a, b, …, a], or None when the graph is acyclic"
    state, stack = {}, []
    def visit(m):
        state[m] = "open"; stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open": return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)): return c
        state[m] = "done"; stack.pop()
    for m in sorted(graph):
        if m not in state and (c := visit(m)): return c
    return None


def _package_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in (ROOT / "bctnb").glob("*.py") if p.stem not in ("__init__", "_modidx")}


def test_cycle_finder_sees_function_local_and_dynamic_imports():
    assert find_cycle(bctnb_import_graph({"a": "from .b import f", "b": "import numpy\nfrom bctnb.c import g"})) is None
    local = {"a": "from .b import f", "b": "def f():\n    from bctnb.a import g\n    return g"}
    assert find_cycle(bctnb_import_graph(local)) == ["a", "b", "a"]
    dynamic = {"a": "import bctnb.b", "b": "x = 1", "c": "from . import a", "d": "def f(): importlib.import_module('bctnb.c')"}
    dynamic["b"] = "from bctnb import d"
    assert find_cycle(bctnb_import_graph(dynamic)) == ["a", "b", "d", "c", "a"]


def test_package_imports_are_acyclic():
    graph = bctnb_import_graph(_package_sources())
    assert graph["losses"] >= {"prototypes", "models", "core"} and "losses" in graph["train"]    # the parser sees edges
    cycle = find_cycle(graph)
    assert cycle is None, (f"import cycle in bctnb: {' -> '.join(cycle)}. Move the shared code into the earlier module "
                           "(by notebook number) so that only later modules import earlier ones")


def test_modules_import_only_earlier_notebooks():
    "Notebook order is the layering: nbs/NN[a-z]_x.ipynb exports a module that imports only modules of earlier notebooks (01 < 01a < 01b < 02)"
    order = {}
    for nb in sorted((ROOT / "nbs").glob("[0-9][0-9]*_*.ipynb")):
        if not (m := re.fullmatch(r"(\d\d[a-z]?)_.+\.ipynb", nb.name)): continue
        src = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"][:3])
        mod = next(l.split()[-1] for l in src.splitlines() if l.startswith("#| default_exp"))
        order[mod] = m.group(1)
    graph = bctnb_import_graph(_package_sources())
    assert set(order) == set(graph), f"modules without a numbered notebook: {set(graph) ^ set(order)}"
    bad = [f"{m} (nbs/{order[m]}) imports {d} (nbs/{order[d]})" for m in graph for d in graph[m] if order[d] >= order[m]]
    assert not bad, "a module imports a later notebook's module: " + "; ".join(sorted(bad))
