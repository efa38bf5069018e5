"""Local launchers of real components: Orthanc, ``airflow standalone``, moto's S3 server, the DAG folder.

``jipfed demo`` (:mod:`jipfed.localfed`), the benchmarks and the tests start their servers with
these; :mod:`jipfed.testing` keeps only test helpers.
"""
