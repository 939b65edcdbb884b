"""clipforge.data_tools: write, stream, check and describe webdataset image-caption shards."""
