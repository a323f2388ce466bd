"""The torch-free bottom layer: configs, graph specs, schedule, the frame loop, video I/O, reports."""
