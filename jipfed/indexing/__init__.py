"""Round records indexed in OpenSearch (for OpenSearch Dashboards); the model store stays the truth."""
