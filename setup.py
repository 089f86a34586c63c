"""mmnorm: small-batch normalization for MMDetection 3.x.

install_requires states the ranges MMDetection 3.x accepts, so installing into
an existing MMDetection environment adds mmnorm alone (torch is the user's own).
The exact stacks the project is tested on are pinned in requirements/.
"""
from setuptools import find_packages, setup

setup(
    name='mmnorm',
    version='0.1.0',
    description='Small-batch normalization (MABN, CBN, BRN, WS-Conv) for MMDetection',
    packages=find_packages(include=['mmnorm', 'mmnorm.*']),
    python_requires='>=3.8',
    install_requires=['mmcv>=2.0.0,<2.2.0', 'mmengine>=0.7.1,<1.0', 'mmdet>=3.0.0,<3.4.0'],
    extras_require={'tests': ['pytest']},
)
