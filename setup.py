"""Installs trax_hourglass: Hourglass (hierarchical Transformer LM) for Trax."""

import setuptools

# Ranges, tested at both ends on Python 3.11-3.13 (constraints/oldest.txt,
# constraints/newest.txt; see docs/dependencies.md). trax 1.4.1 is the newest
# trax; jax below 0.4.38 is untested, newer jax works through trax_hourglass.compat.
INSTALL_REQUIRES = [
    'trax==1.4.1',
    'jax>=0.4.38',
    'jaxlib>=0.4.38',
    'tensorflow==2.21.0',
    'tensorflow-text==2.21.1',
    'tensorflow-datasets==4.9.10',
    'gin-config==0.5.0',
    'numpy>=2.0,<2.5',
]

EXTRAS_REQUIRE = {
    'test': [
        'pytest>=8',
        'pytest-xdist>=3.5',
        'hypothesis>=6.100',
        'nbclient>=0.10',
        'nbformat>=5.10',
        'ipykernel>=6.29',
        'sentencepiece>=0.2.0,<0.3',
    ],
    # HourglassLM(boundaries='unigram'): SentencePiece segmentation targets.
    'unigram': ['sentencepiece>=0.2.0,<0.3'],
    # Accelerator wheels for the installed jax, e.g.
    #   pip install -e '.[gpu]'   (CUDA 12 jaxlib from PyPI)
    #   pip install -e '.[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    'gpu': ['jax[cuda12]>=0.4.38'],
    'tpu': ['jax[tpu]>=0.4.38'],
}

setuptools.setup(
    name='trax_hourglass',
    version='0.1.0',
    description='Hourglass: hierarchical Transformer language models in Trax.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['trax_hourglass', 'trax_hourglass.*']),
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        'console_scripts': [
            'trainer=trax_hourglass.cli.trainer:main',
            'hourglass-eval=trax_hourglass.cli.evaluate:main',
            'hourglass-sample=trax_hourglass.cli.sample:main',
        ],
    },
    license='Apache 2.0',
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
