"""The CPU racecheck of every CUDA kernel configuration the simulator tests run: tests/test_cuda_rnn.py
and tests/test_cuda_selective_scan.py (every cell, dtype, tile and path) in a process whose kernels run
in ThreadSanitizer's build with every instantiation, where CI's test (tests/test_cuda_sim.py) runs a
few small cases in a build of only those. Any read of another thread's write with no barrier between
stops the run with ThreadSanitizer's report (exit status 66). Run it after editing csrc/:
``python bench/sim_racecheck.py [pytest arguments]`` (about five minutes on two cores, the build
included); the exit status is pytest's."""
import subprocess
import sys

from rnnops.cuda_backend import simulator


def main() -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
               "-s",  # (ThreadSanitizer stops the process: a report in pytest's captured output would be lost)
               "-k", "not compile",  # (the nvcc checks run no kernel)
               "tests/test_cuda_rnn.py", "tests/test_cuda_selective_scan.py", *sys.argv[1:]]
    return subprocess.run(command, env=simulator.sanitizer_environment("thread", every_instantiation=True),
                          check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
