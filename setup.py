"""mmnorm: small-batch normalization layers for MMDetection 3.x."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name):
    lines = (HERE / 'requirements' / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


setup(
    name='mmnorm',
    version='0.1.0',
    description='Small-batch normalization (MABN, CBN, BRN, WS-Conv) for MMDetection',
    packages=find_packages(include=['mmnorm', 'mmnorm.*']),
    python_requires='>=3.9',
    install_requires=requirements('runtime.txt'),
    extras_require={'tests': requirements('tests.txt'), 'cpu': requirements('torch-cpu.txt')},
)
