"""JIP Federated: federated learning on medical images for Kaapana / JIP.

The core library (this package, minus :mod:`jipfed.operators` and :mod:`jipfed.plugins`) never
imports Airflow: federation maths, imaging, training and storage are plain, typed Python.
"""

__version__ = "0.1.0"
