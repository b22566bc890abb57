"""Package metadata for lvlm_jax and data_pipelines, and the `lvlm` console script."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7.0",
    "flax>=0.11.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.12",
    "tensorflow-datasets>=4.9.9",
    "array-record>=0.8.1",
    # tensorflow-datasets imports it for builders defined in a package (data_pipelines.tfds_llava)
    # but does not declare it
    "importlib_resources>=6.0",
    "sentencepiece>=0.2.0",
    "protobuf>=3.20",  # sentencepiece's model proto (data_pipelines/tokenizer_sp.py)
    "tokenizers>=0.19",  # tokenizer.json checkpoints; 0.19 reads Llama-3's "ignore_merges"
    "ml_collections>=1.1.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "av>=14.0",  # PyAV: video decoding (data_pipelines/video.py)
    "safetensors>=0.4.3",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.7",  # curves.png of `lvlm sweep` / `lvlm summarize`
]

EXTRAS = {
    # torch is pinned to the CPU build that ships as a local wheel on our machines; a plain
    # "torch" would pull a multi-GB CUDA build just to run reference models in tests.
    "hf": ["torch==2.13.0", "transformers>=5.0"],
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",  # the suite runs on 2 workers (README command 2)
        "ruff>=0.6",
        "torch==2.13.0",
        "transformers>=5.0",
        "tensorflow-cpu>=2.18",
        "pycocoevalcap>=1.2",
    ],
    "tpu": ["libtpu>=0.0.20"],
}

setup(
    name="lvlm_jax",
    version="0.1.0",
    description="Train vision-language models in JAX/Flax: pretraining, instruction tuning, RLHF.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["lvlm_jax*", "data_pipelines*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lvlm=lvlm_jax.cli:main"]},
)
