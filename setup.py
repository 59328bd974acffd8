from setuptools import Extension, setup

# q=auto scores every candidate with SSIMULACRA2; compiled, it costs a few milliseconds at
# 640 px where NumPy took 60 (BENCHMARKS.md, "q=auto: the metric"). Needs a C compiler and
# the Python headers (Debian: gcc, python3-dev), as building any package from source does.
setup(
    ext_modules=[
        Extension(
            "app.render._ssimulacra2",
            ["app/render/_ssimulacra2.c"],
            extra_compile_args=["-O3", "-std=c11", "-fopenmp-simd"],
        )
    ]
)
