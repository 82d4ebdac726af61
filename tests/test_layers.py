"""The package's modules import one way: the layers contract (.importlinter) holds and the
import graph, deferred (function-level) imports included, has no cycle."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

grimp = pytest.importorskip("grimp")


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    adj = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for start in sorted(adj):  # iterative Tarjan
        if start in index:
            continue
        work = [(start, iter(adj[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adj[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in adj[v]:
                    out.append(sorted(comp))
    return out


def test_import_graph_has_no_cycle():
    graph = grimp.build_graph("patchsearch", cache_dir=None)
    assert "patchsearch.index" in graph.modules  # the worktree's package was analysed
    cycles = _cycles(graph)
    assert not cycles, "import cycles (deferred imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle():
    class Graph:
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _cycles(Graph()) == [["a", "b", "c"]]


def test_layers_contract_is_kept():
    lint = pytest.importorskip("importlinter.cli")
    assert lint.lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True, no_logo=True) == 0


def test_free_functions_stay_light_and_callable():
    code = ("import sys, patchsearch; assert 'torch' not in sys.modules; "
            "assert all(callable(getattr(patchsearch, n)) for n in "
            "('query', 'iter_query', 'add_images', 'remove_images')); "
            "import patchsearch.query as q; assert callable(patchsearch.query) and patchsearch.query.query is q.query; "
            "assert not hasattr(patchsearch.PatchIndex, 'query'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_updates_of_an_index_without_a_directory_say_so():
    import patchsearch
    from patchsearch.errors import InputError

    index = patchsearch.PatchIndex.from_embeddings(np.random.default_rng(0).random((20, 4), dtype=np.float32))
    for fn in (patchsearch.add_images, patchsearch.remove_images):
        with pytest.raises(InputError, match=f"^{fn.__name__} needs an index loaded from or saved to"):
            fn(index, ["x.png"])
