"""clipvip: CLIP-ViP (ICLR 2023) video-language model, training and retrieval."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="clipvip",
    version="0.1.0",
    description="CLIP-ViP: video proxy tokens and omnisource cross-modal learning for video-text retrieval",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"clipvip": ["assets/*.gz", "assets/*.txt", "assets/*.json", "apps/search/static/*"]},
    include_package_data=True,
    install_requires=read_requirements("requirements.txt"),
    extras_require={
        "dev": read_requirements("requirements-dev.txt"),
        "wandb": ["wandb"],
        "search": ["faiss-cpu>=1.7"],  # clipvip encode/index/search/serve; faiss-gpu works too
        # clipvip.integrations.mteb: CLIP-ViP as an MTEB model (docs/leaderboards.md)
        "mteb": ["mteb>=2.26,<3"],
        # video_backend "torchcodec"; its Linux wheels load only beside a CUDA build of torch
        "torchcodec": ["torchcodec>=0.2"],
    },
    entry_points={
        "console_scripts": [
            "clipvip=clipvip.apps.main:entry",
        ]
    },
)
