"""Privacy for federated rounds: differential privacy (client and sample level) and secure aggregation.

* :mod:`~jipfed.privacy.settings`: the experiment's ``privacy`` mapping, validated (no torch).
* :mod:`~jipfed.privacy.accountant`: (ε, δ) accounting with opacus' RDP / PRV accountants.
* :mod:`~jipfed.privacy.client_dp`: clipping, adaptive clip norm and Gaussian noise of DP-FedAvg.
* :mod:`~jipfed.privacy.secagg`: pairwise masks (X25519 + ChaCha20) over fixed-point updates.
* :mod:`~jipfed.privacy.sample_dp`: DP-SGD with opacus inside a site's local training.
"""
