"""Event models, topic names and the SQL schema shared by the worker, the API and connectors."""
