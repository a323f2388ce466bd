"""`mirage-export`: ONNX and TensorRT artifacts. Not implemented yet (issue: export and engine build)."""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Export a checkpoint to ONNX and build TensorRT engines (not implemented yet)."""
    raise click.ClickException("mirage-export is not implemented yet")
