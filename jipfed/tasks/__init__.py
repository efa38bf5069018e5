"""The heavy steps of the site and central DAGs as plain functions (no Airflow import).

One function per step (``jipfed.tasks.site_data``, ``jipfed.tasks.site_model``,
``jipfed.tasks.aggregate``) takes a small request (the run's folders and identity, the work item,
a PACS / central / model-store handle) and returns what the Airflow operator returns as XCom.
The in-process operators (``jipfed.operators``) and ``jipfed task <step>`` (a pod, see
``docs/pod-contract.md``) call the same functions; ``jipfed.tasks.env`` is the pod's environment
contract and ``jipfed.tasks.execution`` the configuration that chooses where a step runs.
"""
