"""Measuring a scorer against human opinion: IQA datasets (:mod:`.datasets`: a folder of images plus a MOS CSV)
and the statistics of the protocol (:mod:`.stats`: SRCC, PLCC, KRCC, bootstrap intervals, content-disjoint
splits). Plain data and numbers: it imports nothing above the scorers.
"""
