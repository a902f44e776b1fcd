"""Attribution: concept decomposition, input attribution, steering, generation."""
