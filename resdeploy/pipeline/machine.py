"""The machine probe: which CPU (model, ISA, theoretical peak per core), how busy it is, and which libraries ran.

Every figure resdeploy measures is reported with the machine it came from (bench, engine choice, the run's report,
the degradation experiment, benchmarks/): results are compared only within one run and one machine, and the load
average says how noisy the machine was. Library versions are read from the installed modules (an absent one is
left out); nothing here starts an engine.
"""

from __future__ import annotations

import importlib
import os
import platform
import time
from typing import Any

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve")


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, SIMD flags, load and library versions: enough to tell two runs' machines apart."""
    cpu, flags = _cpuinfo()
    cpu_model = cpu.get("model name") or platform.processor() or platform.machine()
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("numpy", "torch", "onnx", "onnxruntime", "openvino", "tensorrt"):
        try:
            versions[mod] = str(importlib.import_module(mod).__version__).split("-")[0]
        except Exception:  # not installed (or broken): leave it out
            continue
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "MKL_", "ORT_", "OV_")) or k == "GOMP_SPINCOUNT"}
    isa = cpu_isa(flags, cpu.get("vendor_id", ""), _number(cpu.get("cpu family"), int), _number(cpu.get("model"), int),
                  _number(cpu.get("cpu MHz"), float))
    info = {"cpu_model": cpu_model, "logical_cpus": os.cpu_count(), "usable_cpus": affinity, "threading_env": env,
            "isa": isa,
            "simd": [f for f in SIMD_FLAGS if f in flags], "platform": platform.platform(),
            "load_average_start": load_average(), "cpu_busy_start": cpu_busy(), "versions": versions,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError:
        pass
    return info


def _cpuinfo() -> tuple[dict[str, str], set[str]]:
    """The first CPU's /proc/cpuinfo fields (each key's first value) and its flags; empty where there is none."""
    first: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return first, set((first.get("flags") or first.get("Features") or "").split())


def _number(text: str | None, kind: type) -> Any:
    """``kind(text)``, or 0 when the field is missing or not a number."""
    try:
        return kind(text or 0)
    except ValueError:
        return kind(0)


# FLOP (or int8 ops: 2 per multiply-accumulate) per cycle and core, by precision, from the vendors' instruction
# throughputs: Intel server cores have two 512-bit FMA ports; AMD Zen 4 runs AVX-512 on 256-bit units (half);
# AMX tiles do 1024 int8 / 512 bf16 multiply-accumulates per cycle.
def cpu_isa(flags: set[str] | frozenset[str], vendor: str = "", family: int = 0, model: int = 0,
            mhz: float = 0.0) -> dict[str, Any]:
    """What the CPU offers for inference and the theoretical peak per core used for "fraction of peak"."""
    amd = vendor == "AuthenticAMD"
    core = ""
    if amd and family == 25:
        core = "AMD Zen 4" if "avx512f" in flags else "AMD Zen 3"
    elif amd and family == 26:
        core = "AMD Zen 5"
    elif vendor == "GenuineIntel":
        core = ("Intel Xeon with AMX (Sapphire Rapids or later)" if "amx_int8" in flags else
                "Intel with AVX-512" if "avx512f" in flags else "Intel")
    half = amd and family == 25  # Zen 4: 512-bit ops on 256-bit datapaths
    if "avx512f" in flags:
        fp32 = 32 if half else 64
    elif "avx2" in flags and "fma" in flags:
        fp32 = 32
    elif "asimd" in flags or "neon" in flags:
        fp32 = 16
    else:
        fp32 = 8
    if "amx_int8" in flags:
        int8, int8_isa = 2048, "AMX int8"
    elif "avx512_vnni" in flags:
        int8, int8_isa = (128 if half else 256), "AVX-512 VNNI"
    elif "avx_vnni" in flags:
        int8, int8_isa = 128, "AVX-VNNI"
    elif "avx2" in flags:
        int8, int8_isa = 64, "AVX2 (vpmaddubsw)"
    else:
        int8, int8_isa = 2 * fp32, "none"
    if "amx_bf16" in flags:
        bf16, bf16_isa = 1024, "AMX bf16"
    elif "avx512_bf16" in flags:
        bf16, bf16_isa = 2 * fp32, "AVX-512 BF16"
    else:
        bf16, bf16_isa = fp32, "none (emulated via fp32)"
    fp16 = 2 * fp32 if "avx512_fp16" in flags else fp32  # without avx512_fp16 a CPU computes fp16 in fp32
    ghz = round(mhz / 1000.0, 3) if mhz else 0.0
    return {"core": core or vendor or platform.machine(), "int8": int8_isa, "bf16": bf16_isa,
            "flop_per_cycle_per_core": {"fp32": fp32, "fp16": fp16, "bf16": bf16, "int8": int8},
            "clock_ghz": ghz, "clock_source": "/proc/cpuinfo cpu MHz (nominal; turbo not counted)" if ghz else "unknown",
            "peak_gflops_per_core": {k: round(v * ghz, 1) for k, v in
                                     {"fp32": fp32, "fp16": fp16, "bf16": bf16, "int8": int8}.items()} if ghz else {}}


def fraction_of_peak(macs: int, batch: int, p50_ms: float, precision: str, isa: dict[str, Any], threads: int,
                     cores: int | None) -> float | None:
    """Achieved (2 x MACs / p50) over the theoretical peak of ``precision`` on ``min(threads, cores)`` cores."""
    peak = (isa or {}).get("peak_gflops_per_core", {}).get({"bf16": "bf16", "int8": "int8", "fp16": "fp16"}.get(precision, "fp32"))
    if not macs or not peak or p50_ms <= 0:
        return None
    used = max(1, min(threads, cores or threads))
    return (2.0 * macs * batch / (p50_ms / 1e3)) / (peak * 1e9 * used)


def isa_line(m: dict[str, Any]) -> str:
    """The ISA and its theoretical peak per core in one line (``m``: :func:`machine_info`'s dict)."""
    isa = m.get("isa") or {}
    if not isa:
        return "unknown"
    per = isa.get("flop_per_cycle_per_core", {})
    peak = isa.get("peak_gflops_per_core", {})
    ghz = isa.get("clock_ghz")
    return (f"{isa.get('core')}; int8 via {isa.get('int8')}, bf16 via {isa.get('bf16')}; theoretical peak per core at "
            f"{ghz} GHz ({isa.get('clock_source')}): " + ", ".join(
                f"{k} {per.get(k)} op/cycle = {peak.get(k, '?')} GOPS" for k in ("fp32", "bf16", "int8"))
            + "; % of peak = 2 x MACs x batch / p50 over that peak x min(threads, CPUs)")


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy right now, from /proc/stat over ``seconds`` while this process sleeps.

    The load average would also count the previous minute (a bench run just before this one, say).
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1), 3)


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages ([] where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_line(info: dict[str, Any] | None = None) -> str:
    """CPU, ISA and usable CPUs in one line (``info``: :func:`machine_info`'s dict; probed now when None)."""
    m = info or machine_info()
    isa = m.get("isa") or {}
    return (f"{m.get('cpu_model')} ({isa.get('core')}, int8 {isa.get('int8')}, bf16 {isa.get('bf16')}), "
            f"{m.get('usable_cpus')} of {m.get('logical_cpus')} CPUs usable")
