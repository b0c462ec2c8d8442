"""`fastssl selftest` (fastssl/selftest.py): passes on the CPU backends, and says FAIL (exit 1)
for a backend that computes a wrong number."""

import dataclasses

import torch

from fastssl import cli, selftest


def test_quick_selftest_passes_on_cpu(capsys):
    assert cli.main(["selftest", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for case in selftest.CASES:  # every case ran on every CPU backend
        for impl in [i for i in case.impls if i in selftest.backends(torch.device("cpu")) or i == "faiss"]:
            assert any(line.split()[:3] == [case.name, impl, "float64"] for line in out.splitlines()), (case.name, impl)
    assert " 0 failed" in out


def test_a_wrong_backend_fails():
    """A case whose cpp result is off by 1e-6 (relative) fails in fp64 and the exit status says so."""
    base = next(c for c in selftest.CASES if c.name == "nt_xent")

    def build(device, dtype, size):
        run = base.build(device, dtype, size)
        return lambda impl: [t * (1 + 1e-6) if impl == "cpp" else t for t in run(impl)]

    case = dataclasses.replace(base, name="nt_xent/off", build=build, dtypes=(torch.float64,), impls=("cpp",))
    rows = selftest.selftest(torch.device("cpu"), cases=[case])
    assert [(r.backend, r.status) for r in rows] == [("cpp", "FAIL")]
    assert 1e-7 < rows[0].error < 1e-5
