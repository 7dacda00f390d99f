"""dab-detr: DAB-DETR (ICLR 2022) as a Detectron2 plugin project."""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithModelZoo(build_py):
    """Copy the repository's ``configs/`` into the built package as ``dab_detr/model_zoo/configs``, so
    that a wheel finds the model-zoo configs by name (``dab_detr.model_zoo``); a source checkout and an
    editable install read ``configs/`` itself."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
        target = os.path.join(self.build_lib, "dab_detr", "model_zoo", "configs")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

setup(
    name="dab-detr",
    version="0.1.0",
    description="DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR, as a Detectron2 project",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["dab_detr", "dab_detr.*"]),
    cmdclass={"build_py": BuildWithModelZoo},
    # detectron2 is not on PyPI: install it first (tools/setup_env.sh shows one route).
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore",
        "iopath",
        "pycocotools",
        "scipy",
        "numpy",
    ],
    extras_require={
        # deployment: ONNX export (torch.onnx needs onnxscript) and onnxruntime
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
        # SLURM jobs and preemption requeue
        "cluster": ["submitit>=1.5"],
        # the independent reference for the parity tests, its weight formats and real photographs,
        # and every optional extra
        "test": [
            "pytest", "pytest-xdist", "transformers==5.23.0", "timm==1.0.31", "safetensors==0.8.0", "scikit-image==0.26.0",
            "onnx==1.23.2", "onnxruntime==1.31.1", "onnxscript==0.7.2", "submitit==1.5.4",
        ],
    },
)
