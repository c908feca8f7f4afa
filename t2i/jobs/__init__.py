"""Batch generation jobs: prompt files in; images, manifest and gallery out; resumable and sharded."""
