"""Packaging for JIP Federated (distribution ``jip-federated``, import package ``jipfed``)."""

from setuptools import find_packages, setup


def _mapped(folder: str, package: str) -> list[str]:
    """``package`` and its subpackages, whose code lives in ``folder`` (see package_dir)."""
    return [package] + [f"{package}.{sub}" for sub in find_packages(folder)]


CORE = [
    "numpy>=1.26",
    "torch>=2.2",  # install torch==2.13.0 first (CPU build on disk); see scripts/setup.sh
    "monai>=1.4",
    "pydicom>=3.0",
    "pynetdicom>=2.1",
    "dicomweb-client>=0.59",
    "highdicom>=0.23",
    "nibabel>=5.2",
    "dcm2niix>=1.0.20240202",
    "safetensors>=0.4",
    "minio>=7.2",
    "opensearch-py>=2.4",
    "requests>=2.31",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

setup(
    name="jip-federated",
    version="0.1.0",
    description="Federated learning on medical images as an Airflow DAG suite for Kaapana / JIP",
    python_requires=">=3.10",
    packages=find_packages(include=["jipfed", "jipfed.*"])
    + _mapped("operators", "jipfed.operators")
    + _mapped("plugins", "jipfed.plugins"),
    package_dir={"jipfed.operators": "operators", "jipfed.plugins": "plugins"},
    install_requires=CORE,
    extras_require={
        "airflow": ["apache-airflow>=2.11", "apache-airflow-providers-common-compat"],
        "privacy": ["opacus>=1.5"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "moto[server]>=5.0",
            "dicom2nifti>=2.4",
            "ruff>=0.6",
            "opacus>=1.5",
            "apache-airflow==3.3.2",
        ],
    },
    entry_points={
        "console_scripts": ["jipfed=jipfed.cli:main"],
        "airflow.plugins": ["jipfed = jipfed.plugins.jipfed_plugin:JipfedPlugin"],
    },
)
