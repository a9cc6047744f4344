"""internvit: InternViT / InternVL-C/G on PyTorch >= 2.4, OpenMMLab 2.x and FAISS."""
from setuptools import find_packages, setup

BASE = [
    "torch>=2.4", "torchvision>=0.19", "numpy>=1.24", "pillow>=9", "safetensors>=0.4", "sentencepiece>=0.1.99",
    "tqdm>=4.60", "pyarrow>=12",
]
# mmcv is deliberately NOT required here: mmcv-lite and full mmcv install the same `mmcv` package, so a user
# with full mmcv (compiled ops) must not get mmcv-lite forced on top. Pick one: the `mmcv-lite` extra, or
# your own full mmcv build.
# setuptools < 82: mmengine resolves `mmseg::` base configs through pkg_resources, which setuptools 82 removed
SEG = ["mmengine>=0.10,<1.0", "mmsegmentation>=1.2,<1.3", "ftfy", "regex", "prettytable", "scipy", "setuptools<82"]
EXTRAS = {
    "seg": SEG,
    "mmcv-lite": ["mmcv-lite>=2.0.0rc4,<2.3"],
    "retrieval": ["faiss-cpu>=1.8"],
    "openclip": ["open_clip_torch>=2.24", "timm>=1.0"],
    "classification": SEG + ["scikit-learn>=1.3"],
    "video": ["av>=10"],  # zero-shot video classification (classification/video.py)
    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "httptools>=0.6",
              "uvloop>=0.19; sys_platform != 'win32'"],
    "test": ["pytest>=7", "pytest-xdist>=3.2", "ruff", "selenium>=4.20"],
}
EXTRAS["all"] = sorted({d for k, v in EXTRAS.items() if k != "test" for d in v})

setup(
    name="internvit",
    version="0.1.0",
    description="InternViT and InternVL-C/G for mmengine/mmseg 1.x, FAISS retrieval and feature extraction",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["internvit*", "segmentation*", "classification*", "retrieval*"]),
    package_data={"classification": ["metadata/*.json"], "retrieval": ["static/*"]},
    include_package_data=True,
    install_requires=BASE,
    extras_require=EXTRAS,
    license="MIT",
)
