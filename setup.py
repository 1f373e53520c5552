from setuptools import find_packages, setup

setup(
    name="semiseg_d2",
    version="0.1.0",
    description="Semi-supervised semantic segmentation (DGCL, DDFP, class-wise memory bank, Mean Teacher) on Detectron2",
    packages=find_packages(include=["semiseg_d2", "semiseg_d2.*"]),
    package_data={"semiseg_d2": ["data/splits/**/*.txt"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=["numpy<2", "opencv-python-headless<4.11", "fvcore", "iopath", "scipy", "timm"],
)
