"""Built-in training tasks, each written against the public interface in raytrain_spot/train/task.py."""
