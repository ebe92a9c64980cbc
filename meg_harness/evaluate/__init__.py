"""The one evaluation protocol: TF, AG, locality against the unedited model, Score."""
