"""Build hbat: the Python package, the C++ CPU extension and, where CUDA exists, the CUDA extension.

Install against the torch that is already installed (never let pip resolve another one):

    pip install --no-build-isolation .          # or -e . for development

Environment:
    HBAT_FORCE_CPU=1        build the CPU extension only, even where CUDA is available
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0+PTX": A100 and H100/H200)
    HBAT_CPU_NATIVE=1       compile the CPU kernels with -march=native (faster, not portable)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pip's isolated build environment has no torch
    sys.exit(
        "hbat builds its extensions against the installed torch: install torch first, then run\n"
        "    pip install --no-build-isolation .\n"
        "(without --no-build-isolation pip would download another torch into a temporary environment)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cuda_build_decision():
    """Return (build_cuda, reason)."""
    if os.environ.get("HBAT_FORCE_CPU", "0") not in ("", "0"):
        return False, "HBAT_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"


cxx_flags = ["-O3", "-std=c++17"]
if os.environ.get("HBAT_CPU_NATIVE", "0") not in ("", "0"):
    cxx_flags.append("-march=native")

ext_modules = [
    CppExtension(
        "hbat._C",
        sources=_rel("csrc/bindings/library.cpp") + _rel("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        # -fno-math-errno: sqrtf (adamw_ewc_step_) vectorises only when it need not set errno; nothing reads errno
        extra_compile_args=cxx_flags + ["-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
]

build_cuda, reason = cuda_build_decision()
if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    ext_modules.append(
        CUDAExtension(
            "hbat._C_cuda",
            sources=_rel("csrc/cuda/*.cu") + _rel("csrc/bindings/cuda_binding.cpp"),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
        )
    )
    print(f"hbat: building the CPU and CUDA extensions ({reason}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
else:
    print(f"hbat: building the CPU extension only ({reason})", file=sys.stderr)

# Ranges for users: lower bounds are what `make test-oldest` installs and tests; an upper bound only where a
# version is known to break. The exact environment CI tests is requirements/lock.txt (`make lock`).
INSTALL_REQUIRES = ["torch>=2.4", "numpy>=2.0"]
EXTRAS = {
    "triton": ["triton>=3.7"],
    "train": ["transformers>=5.9", "tokenizers>=0.22.2", "pyyaml>=6.0.2", "tqdm>=4.67", "safetensors>=0.7",
              "matplotlib>=3.10", "datasets>=4.8"],
    "trl": ["trl>=1.5.1", "datasets>=4.8", "accelerate>=1.13"],
    "deepspeed": ["deepspeed>=0.19.3"],
    "lora": ["peft>=0.19.1"],
    "bench": ["matplotlib>=3.10", "psutil>=7.0", "pytest-benchmark>=5.2"],
    "dev": ["pytest>=9.0", "pip-tools>=7.5"],
    "docs": ["mkdocs>=1.6.1", "mkdocs-material>=9.8.2"],
}
EXTRAS["test"] = sorted({req for extra in ("triton", "train", "trl", "deepspeed", "lora", "bench", "dev")
                         for req in EXTRAS[extra]})
EXTRAS["all"] = EXTRAS["test"]

setup(
    name="hbat",
    version="0.1.0",
    description="Hybrid Alignment Training: fused EWC kernels (C++, CUDA, Triton) and an alternating SFT/DPO/PPO trainer",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder (no __init__.py: a regular package named `kernels`
    # would hide Hugging Face's `kernels` whenever the root is on sys.path); they install as hbat.kernels, a
    # namespace package. In a checkout or an editable install the link hbat/kernels -> ../kernels finds them.
    packages=find_packages(include=["hbat", "hbat.*"]) + ["hbat.kernels"],
    package_dir={"hbat.kernels": "kernels"},
    package_data={"hbat": ["py.typed"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["hbat=hbat.cli:main"]},
    zip_safe=False,
)
