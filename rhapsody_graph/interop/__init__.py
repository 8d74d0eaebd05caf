"""Other task systems' graphs on rhapsody_graph's scheduler (Dask: :mod:`.dask`)."""
