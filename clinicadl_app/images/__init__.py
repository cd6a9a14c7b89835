"""What both levels do to preprocessed images: templates, cutting parts (modes), tensors, content signatures."""
