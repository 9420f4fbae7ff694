"""Op suite: FusedMetaPooling against the eager reference and torch.compile(reference).

Every case times forward (under no_grad) or forward+backward (autograd.grad of x, α and the gate
convs), rotating among several input sets, and reports achieved GB/s against docs/DESIGN.md's byte
floor for that op and mode, and the percentage of this run's measured copy bandwidth. The fused
variant is timed first and last: the two medians show the run's noise.
"""
from .cases import run_op_case


def test_op(bench, op_case):
    bench.run("ops", op_case.id, run_op_case, op_case, bench.device, bench.timing("ops"),
              bench.copy_gbps(), compile_backend=bench.compile_backend)
