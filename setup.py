from setuptools import Extension, setup

# q=auto scores every candidate with SSIMULACRA2; compiled, it costs about 7 ms at 640 px where
# NumPy takes 8x that (BENCHMARKS.md, "q=auto: the metric"). Building it needs a C compiler and
# the Python headers (Debian: gcc, python3-dev); without them the install goes on (optional)
# and app/render/ssimulacra2.py falls back to the NumPy port.
setup(
    ext_modules=[
        Extension(
            "app.render._ssimulacra2",
            ["app/render/_ssimulacra2.c"],
            extra_compile_args=["-O3", "-std=c11", "-fopenmp-simd"],
            optional=True,
        )
    ]
)
