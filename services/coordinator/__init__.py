"""The aggregation coordinator: site registry, federation config, disclosure ingest, replica
averaging, checkpoint manifest and run status (:func:`.app.create_coordinator_app`)."""
