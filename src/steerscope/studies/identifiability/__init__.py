"""Identifiability study: are orthogonal perturbations of a steering vector behaviourally equivalent to it?"""
