"""train.demo.machine: what the demo's and the benches' timings were measured on."""
import os

from train.demo import machine


def test_cpu_from_cpuinfo_reads_the_model_and_widest_vector_set():
  x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
  assert machine.cpu_from_cpuinfo(x86) == ("AMD EPYC", "AVX2")
  assert machine.cpu_from_cpuinfo(x86.replace("avx2", "avx2 avx512f")) == ("AMD EPYC", "AVX-512")
  assert machine.cpu_from_cpuinfo("processor\t: 0\nFeatures\t: fp asimd crc32\n") == (None, "NEON")
  assert machine.cpu_from_cpuinfo("") == (None, None)


def test_machine_describes_this_host():
  m = machine.info()
  assert m["cores"] == os.cpu_count() and m["backend"] == "cpu" and m["devices"] >= 1
  assert machine.line(m).startswith(f"{m['cpu']} ({os.cpu_count()} logical cores")
