"""MeG: text encoder, familiarity network, neuron hook, weight collection and generators."""
