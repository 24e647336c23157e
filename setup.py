"""peer_jax: language models with PEER layers (Mixture of A Million Experts) in JAX/Flax."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt")) as f:
  requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="peer_jax",
    version="0.1.0",
    description="Train language models with PEER layers (Mixture of A Million Experts) in JAX/Flax",
    long_description=open(os.path.join(here, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peer_jax", "peer_jax.*", "configs", "scripts"]),
    # The CPU kernels' sources: compiled at first use (peer_jax/ops/cpu_kernels.py).
    package_data={"peer_jax.ops": ["*.cc", "*.h"]},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"test": ["pytest==9.2.0", "pytest-xdist==3.8.0"]},
    entry_points={"console_scripts": ["peer-jax-train=scripts.train:run"]},
)
